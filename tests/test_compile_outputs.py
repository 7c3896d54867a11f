"""Model outputs as people have them (issue 11, item 2): compile(..., output=) picks the tensor the loss is put on
out of a tuple, a dict or a Hugging Face ModelOutput, on both engines; a key/value cache is refused with the fix;
a torch.compile'd module is accepted. The loss K-FAC reports is checked against cross-entropy computed here on
the tensor the user means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph


class Heads(nn.Module):
    """Returns the logits with other tensors around them, in the container ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.kind = nn.Linear(6, 8), nn.Linear(8, 3), kind

    def forward(self, x: torch.Tensor):
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        if self.kind == "tuple":
            return logits, h
        if self.kind == "dict":
            return {"hidden": h, "logits": logits}
        if self.kind == "scores":
            return {"hidden": h, "scores": logits}
        return h, logits  # "second"


def data(n: int = 16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


@pytest.mark.parametrize("kind, output, description", [
    ("tuple", None, "element 0 of the model's tuple"),
    ("dict", None, "'logits' of the model's dict"),
    ("scores", "scores", "'scores' of the model's dict"),
    ("second", 1, "1 of the model's tuple"),
    ("second", lambda out: out[1], "<lambda>(the model's tuple)"),
])
def test_the_loss_is_put_on_the_chosen_output(kind, output, description):
    model = Heads(kind)
    x, y = data()
    cm = kronograph.compile(model, (x,), output=output)
    assert cm.output == cm.plan.output == description and [layer.name for layer in cm.layers] == ["body", "head"]
    with torch.no_grad():
        expected = float(F.cross_entropy(model.head(torch.tanh(model.body(x))), y))
    opt = kronograph.optim.KFAC(cm, seed=0)
    first = opt.step(x, y)["loss"]
    assert first == pytest.approx(expected, rel=1e-6)
    for _ in range(10):
        last = opt.step(x, y)["loss"]
    assert last < 0.5 * first


def test_a_dict_without_logits_names_its_keys_and_the_fix():
    with pytest.raises(kronograph.KronographError, match=r"keys \['hidden', 'scores'\] and no 'logits'.*output="):
        kronograph.compile(Heads("scores"), (data()[0],))
    with pytest.raises(kronograph.KronographError, match="model returns 2 outputs"):
        kronograph.compile(Heads("tuple"), (data()[0],), output=5)


def test_the_onnxruntime_engine_puts_its_loss_on_the_chosen_output(tmp_path):
    pytest.importorskip("onnxruntime.training")
    model = Heads("second")
    x, y = data()
    cm = kronograph.compile(model, (x,), output=1, engine="onnxruntime")
    cm.onnxruntime(tmp_path / "artifacts")
    with torch.no_grad():
        expected = float(F.cross_entropy(model.head(torch.tanh(model.body(x))), y))
    info = kronograph.optim.KFAC(cm, seed=0).step(x.numpy(), y.numpy())
    assert info["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_torch_compiled_module_is_compiled_as_its_original():
    model = Heads("tuple")
    x, y = data()
    cm = kronograph.compile(torch.compile(model), (x,))
    assert cm.module is model
    before = model.head.weight.detach().clone()
    kronograph.optim.KFAC(cm, seed=0).step(x, y)
    assert not torch.equal(before, model.head.weight)


def test_a_hugging_face_causal_lm_as_it_comes():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(2))
    with pytest.raises(kronograph.KronographError, match=r"use_cache = False"):
        kronograph.compile(model, (tokens,))
    model.config.use_cache = False
    cm = kronograph.compile(model, (tokens[:, :-1],))
    assert "logits" in cm.output and "CausalLMOutput" in cm.output
    opt = kronograph.optim.KFAC(cm, seed=0)
    losses = [opt.step(tokens[:, :-1], tokens[:, 1:])["loss"] for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


class Sequences(nn.Module):
    """A head on every position, its logits reshaped ([n, T, 3] -> [n * T, 3]) or normalised before the loss."""

    def __init__(self, normalise: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.normalise = nn.Linear(6, 8), nn.Linear(8, 3), normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.body(x))).reshape(-1, 3)
        return torch.log_softmax(logits, -1) if self.normalise else logits


@pytest.mark.parametrize("kind, output, expected", [
    ("tuple", None, ("head",)), ("second", 1, ("head",)), ("second", 0, ()), ("dict", None, ("head",)),
])
def test_the_output_layer_is_the_one_whose_output_the_loss_is_put_on(kind, output, expected):
    """``output_layers``: the layer whose output is the chosen model output; none where the chosen output is
    another layer's activation (tanh of the body's)."""
    x, _ = data()
    assert kronograph.compile(Heads(kind), (x,), output=output).output_layers == expected


@pytest.mark.parametrize("normalise, expected", [(False, ("head",)), (True, ())])
def test_the_output_layer_is_found_through_reshapes_not_through_a_softmax(normalise, expected):
    x = torch.randn(2, 4, 6)
    for engine in ("torch", "onnxruntime"):
        assert kronograph.compile(Sequences(normalise), (x,), engine=engine).output_layers == expected
