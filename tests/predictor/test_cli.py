"""``slicefleet profile`` and ``slicefleet train-length`` end to end on the tiny model (small grids/subsets)."""

from __future__ import annotations

import argparse

import pytest


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_profile_cli_writes_a_loadable_profile(tiny_model_dir, tmp_path, capsys):
    from predictor import profile_cli
    from predictor.latency import load_profile, read_profile

    out = tmp_path / "prof.json"
    args = _args(profile_cli, ["--model", str(tiny_model_dir), "--engine", "hf", "--out", str(out),
                               "--batch-sizes", "1,4", "--lengths", "8,32", "--decode-steps", "3",
                               "--repeats", "1", "--heldout", "2"])
    assert profile_cli.run(args) == 0
    prof = read_profile(out)
    assert prof.key["engine"] == "hf" and prof.key["hardware"]["device"] == "cpu"
    assert prof.key["model_shapes"]["num_hidden_layers"] == 2
    assert prof.meta["runner"] in ("engine", "forward")
    assert len(prof.samples.prefill) == 4 and len(prof.heldout) == 2
    assert load_profile(out, expect={"engine": "hf"}).batch_time(4, 32, 8) > 0
    assert "held-out whole slice" in capsys.readouterr().out


def test_train_length_cli_writes_artefact_and_report(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from predictor import length_cli
    from predictor.length import load_length_predictor

    monkeypatch.setenv("SLICEFLEET_CACHE", str(tmp_path / "cache"))
    out, report = tmp_path / "len.zip", tmp_path / "report.md"
    args = _args(length_cli, ["--model", str(tiny_model_dir), "--limit", "400", "--max-len", "16",
                              "--out", str(out), "--report", str(report)])
    assert length_cli.run(args) == 0
    text = capsys.readouterr().out
    assert "| constant (train median) |" in text and "ms/request" in text
    assert "| xgb regressor |" in report.read_text()
    pred = load_length_predictor(out)
    assert pred.meta["data"]["requests"] == 400 and pred.meta["embedding"]["max_len"] == 16
    assert len(pred.predict(["hello there", "write a long story"], [3, 5])) == 2
    with pytest.raises(FileNotFoundError):
        load_length_predictor(tmp_path / "nope.zip")
