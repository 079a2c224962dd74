"""Strict-device mode: catch host/accelerator mix-ups on a machine without a GPU.

On a GPU, data and models live on ``cuda`` while tensors made by ``torch.tensor(...)``,
``torch.arange(...)`` or ``torch.from_numpy(...)`` without a ``device=`` live on the host,
and three kinds of mistakes fail there but pass silently on a CPU-only machine:

* ``t.numpy()``, ``np.asarray(t)`` or a matplotlib call on a device tensor
  (``TypeError: can't convert cuda:0 device type tensor to numpy``);
* an operation mixing a device tensor with a host tensor that is not a 0-dim scalar
  (``Expected all tensors to be on the same device``);
* indexing a host tensor with device indices
  (``indices should be either on cpu or on the same device as the indexed tensor``).

Strict mode simulates a second device on the CPU. :func:`enable` returns the simulated
device, :data:`SIM_DEVICE` (``cpu:1``); use it wherever the code would use ``cuda``. Every
tensor carries a mark "on the device" or "on the host", and a
:class:`torch.overrides.TorchFunctionMode` follows the marks the way PyTorch moves tensors
between devices:

* ``t.to(SIM_DEVICE)``, ``module.to(SIM_DEVICE)``, ``t.cuda()`` and factories called with
  ``device=SIM_DEVICE`` (or ``device=x.device`` of a marked ``x``) make device tensors;
  ``t.cpu()`` and ``t.to("cpu")`` make host tensors; ``x.device`` of a device tensor is
  :data:`SIM_DEVICE`;
* every other operation's results are on the device when an input is, and inputs must agree
  (host 0-dim tensors may join device operations, as CUDA allows);
* ``copy_`` and ``new_*`` cross devices as in PyTorch; a device tensor may be indexed with host
  indices, a host tensor not with device indices;
* ``numpy()`` and ``__array__`` (what ``np.asarray`` and matplotlib call) refuse device
  tensors; ``item()``, ``tolist()``, ``float()`` work, as they do on CUDA.

Violations raise :class:`DeviceMixError` with PyTorch's own wording for the CUDA case.

Use it in a test with the ``strict_device`` fixture (``tests/conftest.py``), in code with
``with strict_device() as dev: ...``, and in a notebook by setting ``MESA_STRICT_DEVICE=1``
before :func:`mesa_lib.book.chapter_setup` runs (it then puts the chapter's data and models on
the simulated device). Not simulated: generators (a host ``torch.Generator`` drawing device
numbers is an error on CUDA, not here), CUDA-only ops, memory limits, asynchronous execution.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["SIM_DEVICE", "DeviceMixError", "StrictDeviceMode", "enable", "disable", "enabled",
           "strict_device", "on_device", "env_requested"]

#: The simulated device: a second CPU "device" that compares unequal to ``cpu``.
SIM_DEVICE = torch.device("cpu", 1)
_HOST = torch.device("cpu")
_MARK = "_mesa_sim_device"
ENV = "MESA_STRICT_DEVICE"


class DeviceMixError(RuntimeError):
    """A host/device mix-up that would fail on a GPU."""


def on_device(t: Any) -> bool:
    """True when ``t`` is a tensor on the simulated device."""
    return isinstance(t, torch.Tensor) and t.__dict__.get(_MARK, False)


def _mark(t: Any, value: bool) -> None:
    if isinstance(t, torch.Tensor):
        if value:
            t.__dict__[_MARK] = True
        else:
            t.__dict__.pop(_MARK, None)
    elif isinstance(t, (tuple, list)):
        for x in t:
            _mark(x, value)


def _tensors(obj: Any, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


def _is_sim(device: Any) -> bool | None:
    """True for the simulated device, False for another, None for "no device given"."""
    if device is None:
        return None
    if isinstance(device, int):  # .to(0), .cuda(0)
        return True
    try:
        d = torch.device(device)
    except (TypeError, RuntimeError):
        return None
    return d == SIM_DEVICE or d.type == "cuda"


def _fail(message: str, exc: type = DeviceMixError) -> None:
    raise exc(f"[strict device mode: {SIM_DEVICE} stands for the GPU] {message}")


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A new tensor object on the same memory (so that marking it leaves ``t`` alone)."""
    return t.view_as(t)


_T = torch.Tensor
_DEVICE_GET = _T.device.__get__
_GRAD_GET = _T.grad.__get__
_DATA_GET = _T.data.__get__
_NUMPY = {_T.numpy, _T.__array__}
_TO_HOST = {_T.cpu}
_TO_DEVICE = {_T.cuda}
_CROSS = {_T.copy_, _T.new_tensor, _T.new_zeros, _T.new_ones, _T.new_empty, _T.new_full}
_FACTORY_FROM_DATA = {torch.tensor, torch.as_tensor}
_SIZE_ONLY = {_T.view_as, _T.expand_as, _T.reshape_as}  # read only the other tensor's shape
_UNCHECKED = {torch._has_compatible_shallow_copy_type, _T.set_, _T.is_set_to}  # no device semantics
_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                   "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                   "__irshift__", "__imatmul__"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or repr(func)


class StrictDeviceMode(TorchFunctionMode):
    """The torch-function mode behind :func:`enable` (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return SIM_DEVICE if on_device(args[0]) else func(*args)
        if func == _GRAD_GET or func == _DATA_GET:
            out = func(*args)
            _mark(out, on_device(args[0]))
            return out
        if func in _NUMPY:
            if on_device(args[0]) and not kwargs.get("force", False):
                _fail("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy "
                      "the tensor to host memory first.", TypeError)
            return func(*args, **kwargs)
        if func in _TO_HOST or func is _T.to or func in _TO_DEVICE:
            return self._to(func, args, kwargs)
        if func in _CROSS:
            return self._cross(func, args, kwargs)
        if func in _UNCHECKED:
            return func(*args, **kwargs)
        if func in _SIZE_ONLY or func is _T.type_as:
            out = func(*args, **kwargs)
            # type_as(other) converts to other's type, device included
            target = on_device(args[1] if func is _T.type_as else args[0])
            if out is args[0] and target != on_device(out):
                out = _alias(out)
            _mark(out, target)
            return out
        if func in _FACTORY_FROM_DATA:
            return self._from_data(func, args, kwargs)
        if func is _T.__getitem__ or func is _T.__setitem__:
            self._check_index(func, args)
            out = func(*args, **kwargs)
            _mark(out, on_device(args[0]))
            return out
        return self._generic(func, args, kwargs)

    # -- moves ---------------------------------------------------------------------------
    def _to(self, func, args, kwargs):
        src = args[0]
        if func in _TO_HOST:
            target = False
            out = func(*args, **kwargs)
        elif func in _TO_DEVICE:
            target = True
            out = src  # the CPU build has no CUDA: the copy "to the device" is an alias
        else:
            rest = list(args[1:])
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device, dtype
                target = on_device(rest[0])
                out = func(src, rest[0].dtype, *rest[1:], **kwargs)
            else:
                dev = kwargs.pop("device", None)
                if rest and not isinstance(rest[0], torch.dtype) and (
                        isinstance(rest[0], (str, torch.device, int))):
                    dev = rest.pop(0)
                target = _is_sim(dev)
                if dev is not None:
                    rest.insert(0, _HOST if target is not None else dev)
                out = func(src, *rest, **kwargs)
                if target is None:  # dtype-only conversion: stays where it is
                    target = on_device(src)
        if isinstance(src, nn.Parameter) and out is src:
            # module.to(device) / module.cpu() move their parameters in place: (un)mark the
            # parameter itself
            _mark(src, target)
            return src
        if out is src and target != on_device(src):
            out = _alias(src)
        _mark(out, target)
        return out

    def _cross(self, func, args, kwargs):
        src = args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_sim(dev) is not None:
            target = bool(_is_sim(dev))
            kwargs = dict(kwargs, device=_HOST)
        else:
            target = on_device(src)
        out = func(*args, **kwargs)
        if func is _T.copy_:
            return out  # in place: stays on the device of the destination
        _mark(out, target)
        return out

    def _from_data(self, func, args, kwargs):
        data = args[0] if args else kwargs.get("data")
        dev = kwargs.get("device")
        if dev is not None and _is_sim(dev) is not None:
            target = bool(_is_sim(dev))
            kwargs = dict(kwargs, device=_HOST)
        elif isinstance(data, torch.Tensor):
            target = on_device(data)
        else:
            target = False  # a list of numbers (or of 0-dim tensors, read with .item()): host
        out = func(*args, **kwargs)
        if out is data and target != on_device(data):
            out = _alias(out)
        _mark(out, target)
        return out

    # -- checks --------------------------------------------------------------------------
    def _check_index(self, func, args):
        self_t, index = args[0], args[1]
        if not on_device(self_t):
            for t in _tensors(index, []):
                if on_device(t):
                    _fail(f"indices should be either on cpu or on the same device as the indexed "
                          f"tensor (cpu); got device indices for a host tensor of shape "
                          f"{tuple(self_t.shape)} in {_name(func)}")

    def _generic(self, func, args, kwargs):
        dev = kwargs.get("device")
        want = _is_sim(dev)
        if want is not None:
            kwargs = dict(kwargs, device=_HOST)
        tensors = _tensors(args, [])
        _tensors(kwargs, tensors)
        on_dev = [t for t in tensors if on_device(t)]
        if on_dev:
            hosts = [t for t in tensors if not on_device(t) and t.dim() > 0]
            name = _name(func)
            inplace = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDER
            if inplace and args and isinstance(args[0], torch.Tensor) and not on_device(args[0]):
                hosts.insert(0, args[0])
            if hosts:
                _fail(f"Expected all tensors to be on the same device, but found at least two "
                      f"devices, cuda:0 and cpu! ({name}: a device tensor of shape "
                      f"{tuple(on_dev[0].shape)} and a host tensor of shape "
                      f"{tuple(hosts[0].shape)})")
        out = func(*args, **kwargs)
        target = want if want is not None else bool(on_dev)
        if target or want is False:
            _mark(out, target)
        return out


# -- switching it on and off ------------------------------------------------------------
_state: dict[str, Any] = {"mode": None, "param_new": None}


def _param_new(cls, data=None, requires_grad=True):
    """``nn.Parameter(data)`` keeps the mark of ``data`` (e.g. ``copy.deepcopy(model)``)."""
    p = _state["param_new"].__get__(None, cls)(cls, data, requires_grad)
    if on_device(data):
        _mark(p, True)
    return p


def enabled() -> bool:
    """Whether strict mode is on."""
    return _state["mode"] is not None


def enable() -> torch.device:
    """Switch strict mode on (for good, until :func:`disable`); returns :data:`SIM_DEVICE`."""
    if _state["mode"] is None:
        mode = StrictDeviceMode()
        mode.__enter__()
        _state["mode"] = mode
        _state["param_new"] = nn.Parameter.__dict__["__new__"]  # a staticmethod
        nn.Parameter.__new__ = staticmethod(_param_new)  # type: ignore[method-assign]
    return SIM_DEVICE


def disable() -> None:
    """Switch strict mode off (tensors keep their marks but nothing reads them)."""
    mode = _state["mode"]
    if mode is not None:
        mode.__exit__(None, None, None)
        nn.Parameter.__new__ = _state["param_new"]  # type: ignore[method-assign]
        _state["mode"] = _state["param_new"] = None


@contextlib.contextmanager
def strict_device() -> Iterator[torch.device]:
    """``with strict_device() as dev:`` runs the block in strict mode, ``dev`` being
    :data:`SIM_DEVICE`."""
    was_on = enabled()
    dev = enable()
    try:
        yield dev
    finally:
        if not was_on:
            disable()


def env_requested() -> bool:
    """Whether ``MESA_STRICT_DEVICE`` asks for strict mode (set and not ``0``)."""
    return os.environ.get(ENV, "") not in ("", "0")
