"""Every setting is a command-line flag and an ALBERT_* variable; a flag wins over the variable, which wins
over the default. Checked for every field of Settings, with values generated from its type."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from service.settings import Settings, build_parser, load_settings
from tests.service.support import REPO_ROOT, child_env

# Values that need more than their type says (bounds, formats).
SPECIAL = {
    "port": ("8123", 8123, "9234", 9234),
    "log_level": ("warning", "warning", "debug", "debug"),
}


def _samples(name: str, annotation) -> tuple[str, object, str, object]:
    """(env text, its value, flag text, its value): two distinct valid values of the field."""
    if name in SPECIAL:
        return SPECIAL[name]
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return args[1], args[1], args[2 % len(args)], args[2 % len(args)]
    if origin is typing.Annotated:
        return _samples(name, args[0])
    if origin is list:
        if args[0] is int:
            return "2,16,8", [2, 8, 16], "3", [3]
        return "alpha,beta", ["alpha", "beta"], "gamma", ["gamma"]
    if annotation is int:
        return "3000", 3000, "4000", 4000
    if annotation is float:
        return "7.5", 7.5, "9.25", 9.25
    return "from-the-env", "from-the-env", "from-the-flag", "from-the-flag"


FIELDS = list(Settings.model_fields)


def _clear_env(monkeypatch):
    for name in FIELDS:
        monkeypatch.delenv(Settings.env_name(name), raising=False)


@pytest.mark.parametrize("name", FIELDS)
def test_flag_beats_environment_beats_default(name, monkeypatch):
    _clear_env(monkeypatch)
    field = Settings.model_fields[name]
    default = getattr(load_settings([]), name)
    if field.annotation is bool:  # two values only: the variable flips the default, the flag flips it back
        env_text, env_value = str(not default).lower(), not default
        flag_text, flag_value = str(default).lower(), default
    else:
        env_text, env_value, flag_text, flag_value = _samples(name, field.annotation)
    # So that each step below is visible: the variable changes the value, and the flag changes it again.
    assert env_value != default and flag_value != env_value, (name, default, env_value, flag_value)
    flag = "--" + name.replace("_", "-")

    monkeypatch.setenv(Settings.env_name(name), env_text)
    assert getattr(load_settings([]), name) == env_value
    assert getattr(load_settings([flag, flag_text]), name) == flag_value
    assert getattr(load_settings([f"{flag}={flag_text}"]), name) == flag_value
    # Other flags leave it to the environment.
    other = "--host" if name != "host" else "--port"
    assert getattr(load_settings([other, "127.0.0.2" if other == "--host" else "8001"]), name) == env_value


def test_an_empty_flag_beats_a_set_variable(monkeypatch):
    # An empty model source disables the endpoint, and a flag can do that over the environment.
    monkeypatch.setenv("ALBERT_NER_MODEL", "/models/ner")
    assert load_settings([]).ner_model == "/models/ner"
    assert load_settings(["--ner-model", ""]).ner_model == ""


def test_a_bad_flag_value_is_refused_naming_the_setting(monkeypatch):
    _clear_env(monkeypatch)
    with pytest.raises(ValueError, match="max_wait_ms"):
        load_settings(["--max-wait-ms", "-1"])
    with pytest.raises(SystemExit):
        load_settings(["--no-such-flag", "1"])


def test_help_lists_every_flag_with_its_variable():
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        env=child_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name
        assert Settings.env_name(name) in text, name
    assert {a.dest for a in build_parser()._actions if a.dest != "help"} == set(FIELDS)
