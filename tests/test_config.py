"""Layered configuration: precedence of every layer, and every class of bad input refused by name."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from assistant.cli import build_parser, main
from assistant.config import ConfigError, all_keys, load_config
from assistant.daemon_config import TurnEnd
from assistant.run_daemon import load_run_config
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "systemd" / "config.example.yaml"
LAYERS = ("system", "user", "file", "env", "flag")


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _layered(tmp_path: Path, top: str) -> tuple[argparse.Namespace, dict, Path]:
    """Set dialogue.min_barge_in_ms in every layer up to `top`, each to its own value;
    dialogue.silence_end_s only in the system file (it must survive every later layer)."""
    key, values = "min_barge_in_ms", dict(zip(LAYERS, (100, 200, 300, 400, 500)))
    system = _write(tmp_path / "etc/config.yaml", {"dialogue": {key: values["system"], "silence_end_s": 7.5}})
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    if LAYERS.index(top) >= 1:
        _write(tmp_path / "xdg/freeze-omni/config.yaml", {"dialogue": {key: values["user"]}})
    argv = ["run"]
    if LAYERS.index(top) >= 2:
        argv += ["--config", str(_write(tmp_path / "mine.yaml", {"dialogue": {key: values["file"]}}))]
    if LAYERS.index(top) >= 3:
        env["FREEZE_OMNI_DIALOGUE__MIN_BARGE_IN_MS"] = str(values["env"])
    if LAYERS.index(top) >= 4:
        argv += ["--set", f"dialogue.{key}={values['flag']}"]
    return build_parser().parse_args(argv), env, system


@pytest.mark.parametrize("top", LAYERS)
def test_each_layer_overrides_the_ones_before(tmp_path, top):
    args, env, system = _layered(tmp_path, top)
    loaded = load_config(args.config, cli=_flags(args), env=env, system_path=system)
    expected = {"system": 100, "user": 200, "file": 300, "env": 400, "flag": 500}[top]
    assert loaded.config.dialogue.min_barge_in_ms == expected
    assert loaded.config.dialogue.silence_end_s == 7.5, "a key set only below is kept"
    source = loaded.sources["dialogue.min_barge_in_ms"]
    assert {"system": str(system), "user": "xdg/freeze-omni/config.yaml", "file": "--config",
            "env": "environment FREEZE_OMNI_DIALOGUE__MIN_BARGE_IN_MS", "flag": "--set"}[top] in source


def test_flags_win_over_environment(tmp_path, monkeypatch):
    monkeypatch.setattr("assistant.config.SYSTEM_CONFIG_PATH", tmp_path / "none.yaml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("FREEZE_OMNI_AUDIO__INPUT_DEVICE", "from-env")
    monkeypatch.setenv("FREEZE_OMNI_VAD__AGGRESSIVENESS", "3")
    args = build_parser().parse_args(["run", "--input-device", "from-flag", "--set", "dialogue.turn_end=vad",
                                      "--model-dir", "/m", "--llm-dir", "/l"])
    loaded = load_run_config(args, check_paths=False)
    assert loaded.config.audio.input_device == "from-flag"
    assert loaded.sources["audio.input_device"] == "--input-device"
    assert loaded.config.dialogue.turn_end is TurnEnd.VAD
    assert loaded.config.vad.aggressiveness == 3
    assert loaded.sources["vad.aggressiveness"].startswith("environment")
    assert loaded.sources["vad.frame_ms"] == "default" and loaded.config.models.model_dir == "/m"


def test_run_flags_keep_working_without_any_file(tmp_path):
    args = build_parser().parse_args(["run", "--model-dir", "/m", "--llm-dir", "/l", "--no-aec", "--turn-end",
                                      "vad", "--vad-aggressiveness", "0", "--events", "ev.jsonl"])
    config = load_config(cli=_flags(args), env={"XDG_CONFIG_HOME": str(tmp_path)}, system_path=None).config
    settings = config.daemon_settings()
    assert not settings.echo.aec_enabled and settings.dialogue.turn_end is TurnEnd.VAD
    assert settings.vad.aggressiveness == 0 and settings.events_path == "ev.jsonl"


def _flags(args):
    from assistant.run_daemon import flag_layer

    settings, problems = flag_layer(args)
    assert not problems
    return settings


# ---- bad input: exit 2, the file and the key named ------------------------------------------------

@pytest.mark.parametrize("text, key, hint", [
    pytest.param("vad:\n  agressiveness: 3\n", "vad.agressiveness", "did you mean vad.aggressiveness",
                 id="unknown-key"),
    pytest.param("dialog:\n  turn_end: vad\n", "dialog", "did you mean dialogue", id="unknown-section"),
    pytest.param("aggressiveness: 3\n", "aggressiveness", "vad.aggressiveness", id="field-outside-section"),
    pytest.param("vad:\n  aggressiveness: loud\n", "vad.aggressiveness", "expects a whole number",
                 id="wrong-type"),
    pytest.param("aec:\n  aec_enabled: 1\n", "aec.aec_enabled", "expects true or false", id="int-for-bool"),
    pytest.param("vad:\n  aggressiveness: 7\n", "vad.aggressiveness", "use 0..3", id="out-of-range"),
    pytest.param("vad:\n  frame_ms: 25\n", "vad.frame_ms", "10, 20 or 30", id="not-a-webrtcvad-frame"),
    pytest.param("dialogue:\n  silence_end_s: -1\n", "dialogue.silence_end_s", "negative",
                 id="negative-duration"),
    pytest.param("aec:\n  near_end_margin_db: 3\n", "aec.near_end_margin_db", "at least 6 dB",
                 id="near-end-margin-lets-echo-through"),
    pytest.param("dialogue:\n  turn_end: file\n", "dialogue.turn_end", "model, vad", id="bad-choice"),
    pytest.param("server:\n  http_port: 70000\n", "server.http_port", "0..65535", id="port"),
    pytest.param("models:\n  model_dir: /no/such/dir\n", "models.model_dir", "no such directory",
                 id="missing-model"),
    pytest.param("models:\n  backend: onnx\n", "models.onnx_dir", "export-onnx", id="onnx-without-graphs"),
    pytest.param("vad: [1, 2]\n", "vad", "must be a mapping", id="section-not-mapping"),
    pytest.param("vad:\n  aggressiveness: [\n", "(file)", "not valid YAML", id="yaml-syntax"),
])
def test_config_check_names_file_key_and_fix(tmp_path, capsys, text, key, hint):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if f": {key}:" in ln)
    assert str(path) in line and hint in line, err


def test_a_model_directory_that_is_not_a_model(tmp_path, tiny_dir, capsys):
    models = {"model_dir": str(tiny_dir), "llm_dir": str(tiny_dir / "llm")}
    path = _write(tmp_path / "c.yaml", {"models": models})
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.model_dir" in err and "missing audiollm/final.pt" in err and "llm_dir" not in err


def test_good_file_passes_check(tmp_path, tiny_dir, capsys):
    path = _write(tmp_path / "c.yaml", {"models": {"model_dir": str(tiny_dir / "checkpoints"),
                                                   "llm_dir": str(tiny_dir / "llm")},
                                        "vad": {"aggressiveness": 3}})
    assert main(["config", "check", str(path)]) == 0
    assert "config ok" in capsys.readouterr().out


def test_bad_environment_variable_is_an_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr("assistant.config.SYSTEM_CONFIG_PATH", tmp_path / "none.yaml")
    monkeypatch.setenv("FREEZE_OMNI_VAD__AGRESSIVENESS", "3")
    monkeypatch.setenv("FREEZE_OMNI_SERVER__HTTP_PORT", "eighty")
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert "FREEZE_OMNI_VAD__AGRESSIVENESS" in err and "did you mean FREEZE_OMNI_VAD__AGGRESSIVENESS" in err
    assert "FREEZE_OMNI_SERVER__HTTP_PORT: server.http_port: expects a whole number" in err


def test_run_refuses_a_bad_flag_value_before_loading_anything(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["run", "--model-dir", str(tmp_path / "none"), "--llm-dir", str(tmp_path),
                 "--set", "vad.frame_ms=25"]) == 2
    err = capsys.readouterr().err
    assert "--model-dir: models.model_dir" in err and "--set vad.frame_ms: vad.frame_ms: 25" in err


def test_run_without_models_says_how_to_give_them(capsys, tmp_path, monkeypatch):
    import quantized_models.embedded_model as embedded

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    assert main(["run"]) == 2
    assert ("models.model_dir: not set and this install has no embedded default model"
            in capsys.readouterr().err)


# ---- show and the shipped example --------------------------------------------------------------

def test_show_prints_merged_values_with_sources_as_valid_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("FREEZE_OMNI_DIALOGUE__RESPOND_PROBABILITY", "0.7")
    assert main(["config", "show", "--set", "vad.aggressiveness=1"]) == 0
    out = capsys.readouterr().out
    assert "respond_probability: 0.7" in out
    assert "# environment FREEZE_OMNI_DIALOGUE__RESPOND_PROBABILITY" in out
    assert "# --set vad.aggressiveness" in out
    shown = yaml.safe_load(out)
    assert shown["vad"]["aggressiveness"] == 1 and shown["dialogue"]["respond_probability"] == 0.7


def test_show_masks_the_server_token(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("FREEZE_OMNI_SERVER__TOKEN", "s3cret-value")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-value" not in out and yaml.safe_load(out)["server"]["token"] == "<set>"


def test_example_config_is_valid_and_documents_every_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    written = {f"{section}.{name}" for section, body in data.items() for name in body}
    assert written == set(all_keys()), f"add to {EXAMPLE.name}: {sorted(set(all_keys()) - written)}"
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"{EXAMPLE.name}:{i + 1} has no comment: {line}"
    load_config(EXAMPLE, env={}, system_path=None, user_path=Path("/nonexistent"))


@pytest.mark.parametrize("value, expected", [("null", None), ("30", 30.0)])
def test_near_end_margin_reaches_the_echo_canceller(tmp_path, value, expected):
    pytest.importorskip("pywebrtc_audio")
    from assistant.run_daemon import _echo_canceller

    path = tmp_path / "aec.yaml"
    path.write_text(f"aec:\n  near_end_margin_db: {value}\n")
    echo = load_config(path, env={}, system_path=None, user_path=Path("/nonexistent")).config.aec
    canceller = _echo_canceller(echo)
    if expected is None:
        assert canceller.near_end is None
    else:
        assert canceller.near_end.margin == pytest.approx(10 ** (expected / 10))  # a power ratio


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        load_config(cli=[], env={"FREEZE_OMNI_VAD__FRAME_MS": "25", "FREEZE_OMNI_VAD__AGGRESSIVENESS": "9"},
                    system_path=None, user_path=Path("/nonexistent"))
    assert {p.key for p in err.value.problems} == {"vad.frame_ms", "vad.aggressiveness"}
