"""The testbed trainer's checkpoints: safetensors + JSON, exact on resume, and never a pickle."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest

from env.models.testbed.model import model_config
from env.models.testbed.train import CKPT_META, TrainArgs, load_checkpoint, save_checkpoint, train
from features.errors import ConfigError

torch = pytest.importorskip("torch")


def _model_and_opt(seed: int):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(32, hidden=64, layers=1, heads=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _one_step(model, opt) -> None:  # type: ignore[no-untyped-def]
    x = torch.randint(0, 32, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model, opt = _model_and_opt(0)
    _one_step(model, opt)
    rng = random.Random(7)
    rng.random()
    save_checkpoint(tmp_path, model, opt, 1, rng)

    model2, opt2 = _model_and_opt(1)  # other initial weights: all must come from the file
    step, rng2 = load_checkpoint(tmp_path, model2, opt2)
    assert step == 1
    assert rng2.getstate() == rng.getstate()
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for idx, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][idx][key])), key
    # One more step from either gives the same weights.
    torch.manual_seed(3)
    _one_step(model, opt)
    torch.manual_seed(3)
    _one_step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    # Only the newest tensor file is kept.
    save_checkpoint(tmp_path, model, opt, 2, rng)
    assert sorted(p.name for p in tmp_path.glob("state-*.safetensors")) == ["state-2.safetensors"]


class _Planted:
    """A pickle that would create a file when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    out = tmp_path / "model"
    ckpt = out / ".ckpt"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (ckpt / "state.pt").write_bytes(pickle.dumps({"model": _Planted(marker)}))
    args = TrainArgs(out=out, steps=1, batch=1, block=8, hidden=64, layers=1, threads=1)
    with pytest.raises(ConfigError, match="never loads pickle"):
        train(args)
    assert not marker.exists()


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    model, opt = _model_and_opt(0)
    save_checkpoint(tmp_path, model, opt, 1, random.Random(0))
    (tmp_path / CKPT_META).write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        load_checkpoint(tmp_path, model, opt)


def test_init_from_starts_from_a_trained_model_and_keeps_its_shape(tmp_path: Path) -> None:
    tiny = {"batch": 1, "block": 8, "threads": 1, "checkpoint_every": 1}
    first = train(TrainArgs(out=tmp_path / "a", steps=2, hidden=64, layers=1, **tiny))
    # the shape comes from the folder, not from --hidden / --layers
    second = train(
        TrainArgs(out=tmp_path / "b", steps=1, init_from=first, task="reasoning", **tiny)
    )
    import json

    cfg_a = json.loads((first / "config.json").read_text())
    cfg_b = json.loads((second / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        assert cfg_a[key] == cfg_b[key]
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_init_from_a_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = TrainArgs(out=tmp_path / "b", steps=1, batch=1, block=8, init_from=tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"--init-from .*no config\.json"):
        train(args)
    assert not (tmp_path / "b" / "model.safetensors").exists()
