// The ipywidgets renderer (@jupyter-widgets/html-manager 1.x, embed.js) typesets widget
// labels with the MathJax 2 API, `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`.
// The book loads MathJax 3, which has no `Hub`: every widget with a description threw
// "Cannot read properties of undefined (reading 'Queue')". Translate the call to MathJax 3.
// Loaded deferred after MathJax (so `MathJax.startup` exists) and before the widgets render
// (embed.js waits for the window's load event).
(function () {
  var mj = window.MathJax;
  if (!mj || mj.Hub || !mj.startup) return; // no MathJax, or MathJax 2 (has its own Hub)
  mj.Hub = {
    Queue: function (command) {
      var element = Array.isArray(command) ? command[2] : undefined;
      mj.startup.promise.then(function () {
        return mj.typesetPromise(element ? [element] : undefined);
      });
    },
  };
})();
