"""The GPU path of ``harness run ovss``, exercised on a CPU.

* No host sync in the per-window and per-image path. A "host sync" is any point where the host must wait for a
  device value: reading a scalar (``item``, ``bool``, ``float``, ``int``, a Python ``if`` on a tensor all dispatch
  ``aten._local_scalar_dense``), ops whose output size depends on values (``nonzero``, boolean-mask indexing,
  ``masked_select``, ``unique``, ``bincount``, ``histc``, ``repeat_interleave`` by a tensor), ops that return a
  Python bool (``equal``, ``is_nonzero``) and device-to-host copies (``.cpu()``, ``.tolist()``, ``.numpy()``).
  On a CPU nothing waits, so :class:`HostSyncs` records these events while the evaluator's loop runs: every aten
  op passes through a ``TorchDispatchMode``, and the copy methods (which a CPU tensor serves without any aten op)
  are patched. What remains by design: ``--save-predictions`` (one copy per image and method), the partial state
  every 60 s and the records at the end (outside the loop).
* The CUDA policy (batch 32, pinned loader, ``non_blocking`` copies, device-side IoU areas) forced on the CPU
  gives the CPU policy's record exactly (fp32): metrics and per-class IoU/Acc.
* The device-side IoU update equals a numpy re-computation of mmseg's ``intersect_and_union``.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from harness import runtime
from harness.cli import main
from harness.errors import ConfigError
from harness.evaluators import ovss
from harness.metrics.segmentation import IoUAccumulator
from harness.results.record import load_records

#: aten ops that make the host wait for the device on CUDA (value-dependent output sizes or Python scalars)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
            "unique_consecutive", "bincount", "histc", "equal", "is_nonzero", "allclose"}
#: indexing ops that sync when an index is a boolean (or uint8) mask: it is turned into positions first
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
#: Python-level methods that copy a tensor to the host (on a CPU tensor they run without any aten op)
COPY_METHODS = ("cpu", "tolist", "numpy")

#: a CPU-sized slide protocol with PAMR, a probability and an area threshold, so every post-processing step runs
PROTOCOL = {"id": "gpu-path", "version": 1, "task": "ovss", "description": "tiny CPU protocol (GPU path test)",
            "source": "tests", "defaults": {"mode": "slide", "crop": 48, "stride": 32, "max_long_side": 2048,
                                            "resize": 72, "logit_scale": 40, "prob_thd": 0.1, "area_thd": 0.05,
                                            "pamr": {"steps": 2, "dilations": [1, 2]}, "name_set": "sclip",
                                            "templates": "test_one"},
            "datasets": {"voc21": {}}}
METHODS = "vanilla,naclip,sclip"
N_IMAGES = 3


class HostSyncs(TorchDispatchMode):
    """Records every host-sync event (op name and the harness line that caused it) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.events: List[str] = []
        self._saved: Dict[str, Callable[..., Any]] = {}

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/harness/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/harness/', 1)[1]}:{frames[-1].lineno}" if frames else "?"
        self.events.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self._note(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
                and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
            self._note(name)
        elif name in INDEX_OPS and len(args) > 1:
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self._note(f"{name} with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):  # type: ignore[no-untyped-def]
        for m in COPY_METHODS:
            real = getattr(torch.Tensor, m)
            self._saved[m] = real

            def counted(t, *a, _real=real, _m=m, **k):  # type: ignore[no-untyped-def]
                self._note(f".{_m}()")
                return _real(t, *a, **k)

            setattr(torch.Tensor, m, counted)
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        for m, real in self._saved.items():
            setattr(torch.Tensor, m, real)
        return super().__exit__(*exc)


def _set_by_mask(t: torch.Tensor) -> None:
    u = t.clone()
    u[u > 1] = 0


def test_the_counter_sees_every_kind_of_sync() -> None:
    t = torch.tensor([0, 2, 1, 2])
    cases: List[Callable[[], Any]] = [
        lambda: t.sum().item(), lambda: bool(t.sum()), lambda: float(t.max()), lambda: t[t > 0],
        lambda: t.nonzero(), lambda: torch.bincount(t), lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(),
        lambda: t.unique(), lambda: torch.equal(t, t), lambda: t.repeat_interleave(t), lambda: _set_by_mask(t),
    ]
    for i, case in enumerate(cases):
        with HostSyncs() as c:
            case()
        assert c.events, f"case {i} not seen"
    quiet = [lambda: t.masked_fill(t > 0, 1), lambda: torch.where(t > 0, t, 5),
             lambda: torch.zeros(3, dtype=torch.int64).scatter_add_(0, t.clamp(max=2), torch.ones_like(t)),
             lambda: t[1:3] + 1, lambda: t.argmax()]
    for i, case in enumerate(quiet):
        with HostSyncs() as c:
            case()
        assert not c.events, (i, c.events)
    assert torch.Tensor.cpu is not None and "counted" not in torch.Tensor.cpu.__name__  # patches are undone


@pytest.fixture()
def voc_root(tmp_path: Path, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    monkeypatch.setattr(ovss, "CHECKPOINT_EVERY_S", 1e9)  # no partial state inside the counted loop
    return write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=N_IMAGES, size=(60, 80), seed=4)


def _run(tmp_path: Path, root: str, name: str, *extra: str, device: str = "cpu") -> Dict[str, Any]:
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(PROTOCOL))
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--method", METHODS,
               "--dataset", "voc21", "--data-root", root, "--protocol", str(proto), "--results-dir",
               str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"), "--device", device, "--workers", "0",
               "--no-progress", *extra])
    assert rc == 0
    return {r.method: r for r in load_records(str(tmp_path / name))}


def _count_loop(monkeypatch) -> HostSyncs:  # type: ignore[no-untyped-def]
    counter = HostSyncs()
    real = ovss.OVSSEvaluator._loop

    def counted(self, *a, **k):  # type: ignore[no-untyped-def]
        with counter:
            return real(self, *a, **k)

    monkeypatch.setattr(ovss.OVSSEvaluator, "_loop", counted)
    return counter


def _force_cuda_policy(monkeypatch) -> List[bool]:  # type: ignore[no-untyped-def]
    """The CUDA rules on the CPU device; returns the ``non_blocking`` flag of every image copy."""
    monkeypatch.setattr(ovss, "device_policy", lambda device: runtime.device_policy(device, kind="cuda"))
    flags: List[bool] = []
    real = ovss.to_model_input

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        flags.append(bool(a[4] if len(a) > 4 else k.get("non_blocking", False)))
        return real(*a, **k)

    monkeypatch.setattr(ovss, "to_model_input", spy)
    return flags


def test_no_host_sync_per_window_or_image_under_the_cuda_policy(tmp_path: Path, voc_root: str, monkeypatch) -> None:
    flags = _force_cuda_policy(monkeypatch)
    counter = _count_loop(monkeypatch)
    recs = _run(tmp_path, voc_root, "r")
    assert set(recs) == {"vanilla", "naclip", "sclip"} and recs["vanilla"].settings["batch_size"] == 32
    assert flags == [True] * N_IMAGES  # the copies were queued (non_blocking)
    assert counter.events == [], counter.events


def test_save_predictions_is_the_one_sync_per_image(tmp_path: Path, voc_root: str, monkeypatch) -> None:
    counter = _count_loop(monkeypatch)
    _run(tmp_path, voc_root, "r", "--save-predictions", str(tmp_path / "preds"))
    copies = [e for e in counter.events if e.startswith(".cpu()")]
    assert len(copies) == N_IMAGES * 3, counter.events  # one copy per image and method, to write the PNG
    line = copies[0].split(" at ")[1]
    assert line.startswith("evaluators/ovss.py") and all(e.endswith(line) for e in counter.events), counter.events


def test_cuda_policy_record_equals_the_cpu_policy_record(tmp_path: Path, voc_root: str, monkeypatch) -> None:
    cpu = _run(tmp_path, voc_root, "cpu")
    with monkeypatch.context() as m:
        _force_cuda_policy(m)
        cuda = _run(tmp_path, voc_root, "cuda")
    for method, rec in cpu.items():
        assert rec.settings["batch_size"] == 2 and cuda[method].settings["batch_size"] == 32
        assert cuda[method].metrics == rec.metrics, method
        assert cuda[method].per_class == rec.per_class, method
    assert len({r.metrics["mIoU"] for r in cpu.values()}) > 1  # the methods differ: the comparison means something


def test_device_policy_rules() -> None:
    cpu = torch.device("cpu")
    p = runtime.device_policy(cpu)
    assert (p.kind, p.batch_size, p.pin_memory, p.non_blocking, p.profiler_sync) == ("cpu", 2, False, False, None)
    q = runtime.device_policy(cpu, kind="cuda")
    assert (q.kind, q.batch_size, q.non_blocking) == ("cuda", 32, True)
    assert q.pin_memory == torch.cuda.is_available()  # pinning needs the CUDA driver
    assert q.profiler_sync is not None and q.autocast_device_type == "cpu"  # autocast follows the tensors
    q.synchronize()  # a CPU device has nothing to wait for
    with pytest.raises(ConfigError, match="device policy 'tpu'"):
        runtime.device_policy(cpu, kind="tpu")


def _np_areas(preds: List[np.ndarray], labels: List[np.ndarray], n: int, ignore: int) -> np.ndarray:
    """mmseg ``intersect_and_union`` summed over images: rows intersect, union, pred, label."""
    out = np.zeros((4, n), dtype=np.int64)
    for p, g in zip(preds, labels):
        keep = g != ignore
        p, g = p[keep], g[keep]
        h = [np.bincount(x[(x >= 0) & (x < n)], minlength=n) for x in (p[p == g], p, g)]
        out += np.stack([h[0], h[1] + h[2] - h[0], h[1], h[2]])
    return out


def test_device_side_iou_update_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    n, ignore = 5, 255
    preds = [rng.integers(-1, n + 2, size=(7, 9)) for _ in range(3)]  # ids outside 0..n-1 count for no class
    labels = [np.where(rng.random((7, 9)) < 0.2, ignore, rng.integers(0, n + 1, size=(7, 9))) for _ in range(3)]
    acc = IoUAccumulator(n, ignore, device=torch.device("cpu"))
    for p, g in zip(preds, labels):
        acc.update(torch.from_numpy(p), torch.from_numpy(g).to(torch.uint8))
    np.testing.assert_array_equal(acc.areas.numpy(), _np_areas(preds, labels, n, ignore))
    back = IoUAccumulator.from_state_dict(acc.state_dict(), device=torch.device("cpu"))
    assert torch.equal(back.areas, acc.areas)
    np.testing.assert_array_equal(np.array(back.compute()["IoU"]), np.array(acc.compute()["IoU"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_no_cuda_sync_in_the_hot_path_on_a_gpu(tmp_path: Path, voc_root: str, monkeypatch) -> None:
    """On a GPU, CUDA itself says where the host waits: the per-window and per-image functions run under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call."""

    def strict(fn):  # type: ignore[no-untyped-def]
        def wrapped(*a, **k):  # type: ignore[no-untyped-def]
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        return wrapped

    for name in ("to_model_input", "dense_logits", "pamr", "postprocess"):
        monkeypatch.setattr(ovss, name, strict(getattr(ovss, name)))
    monkeypatch.setattr(IoUAccumulator, "update", strict(IoUAccumulator.update))
    recs = _run(tmp_path, voc_root, "r", device="cuda")
    assert recs["vanilla"].settings["batch_size"] == 32 and recs["vanilla"].device.startswith("cuda")


def test_artifacts_under_the_cuda_policy_match_the_cpu_policy(tmp_path: Path, monkeypatch) -> None:
    """``harness run artifacts`` takes its batch size, pinning and copies from the same policy: forced to the CUDA
    rules on the CPU (all 8 views of 2 images in one batch of 32 instead of batches of 2) its numbers stay."""
    from PIL import Image

    from harness.backbones.planted import CLIP_MEAN, CLIP_STD, low_information_images
    from harness.evaluators import artifacts
    from harness.protocols import get_protocol

    images = tmp_path / "images"
    images.mkdir()
    rgb = low_information_images(2, (224, 224), seed=5) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) \
        + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(rgb):
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(images / f"img{i}.png")
    with open(get_protocol("artifacts", "phreg").path) as f:  # the shipped protocol at the planted model's size
        data = yaml.safe_load(f)
    data.pop("default", None)
    data["id"] = "gpu-path"
    data["defaults"].update({"size_for_patch": {16: 224}, "views": 4})
    proto = str(tmp_path / "proto.yaml")
    Path(proto).write_text(yaml.safe_dump(data))

    def run(name: str) -> Any:
        assert main(["run", "artifacts", "--backbone", "test-planted-clip", "--method", "vanilla", "--dataset",
                     "folder", "--data-root", str(images), "--random-init", "--protocol", proto, "--workers", "0",
                     "--device", "cpu", "--results-dir", str(tmp_path / name), "--no-progress"]) == 0
        (rec,) = load_records(str(tmp_path / name))
        return rec

    cpu = run("cpu")
    monkeypatch.setattr(artifacts, "device_policy", lambda device: runtime.device_policy(device, kind="cuda"))
    cuda = run("cuda")
    assert cpu.settings["batch_size"] == 2 and cuda.settings["batch_size"] == 32
    # other batch shapes may round the last bits of a matmul differently (as the resume test allows)
    assert cuda.metrics == pytest.approx(cpu.metrics, abs=1e-9)
