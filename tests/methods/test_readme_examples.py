"""The four method examples of the README ("Writing a cleaning method") run as written."""
from __future__ import annotations

import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_method_examples_run(tmp_path, monkeypatch) -> None:
    from harness.models import attach_method, build_dense_model
    from harness.registry import METHODS

    text = open(README, encoding="utf-8").read()
    block = text.split("### Writing a cleaning method", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    # register the examples in a throw-away copy of the method registry, taken after the built-in methods are
    # discovered: discovery runs once, so one that first ran inside the copy would leave the registry empty
    METHODS.names()
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(METHODS, "_aliases", dict(METHODS._aliases))
    exec(compile(code, "README.md", "exec"), {})
    weights = tmp_path / "denoiser.pt"
    torch.save({"scale": torch.tensor(0.5)}, weights)
    base = build_dense_model("test-planted-clip", "vanilla", random_init=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        model = attach_method(base.backbone, "my-register+my-lastblock+my-flip-average")
        assert model.name == "my-register+my-lastblock+my-flip-average"
        assert model.forward_dense(x).patch.shape == (1, 32, 4, 6)
        den = attach_method(base.backbone, "my-denoiser", method_weights=str(weights))
        assert list(den.method_weights) == ["my-denoiser"]
        assert torch.isfinite(den.forward_dense(x).patch).all()
