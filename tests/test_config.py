"""Tests of the configuration language (the mosaic_client/config package) and the OR/AND example."""

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mosaic_client.config import (
    TORCH_LOSSES,
    ConfigError,
    ExpandedConfig,
    Problem,
    load_config,
    parse_value,
    pipelines_to_json,
    resolve_path,
    typed_scalar,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "or_mlp"

Sections = dict[str, dict[str, str]]

MODULE_SOURCE = "class Data:\n    pass\n\n\nclass Model:\n    pass\n"


def render(sections: Sections) -> str:
    lines: list[str] = []
    for name, entries in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
        lines.append("")
    return "\n".join(lines)


def base() -> Sections:
    return {
        "PROCESS": {
            "lr": "0.01",
            "epochs": "3",
            "data_scheme": "data",
            "pipeline_scheme": "model",
            "loss_function": "MSELoss",
        },
        "MONITOR": {
            "need_gpu": "false",
            "gpu_available": "None",
            "nb_processus": "1",
            "multiplicity": "1",
        },
        "data": {"type": "data", "class": "Data", "path_to_class": "mod.py", "key": "d_{class}"},
        "model": {
            "type": "model",
            "class": "Model",
            "path_to_class": "mod.py",
            "width": "4",
            "key": "m_{class}",
        },
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "mod.py").write_text(MODULE_SOURCE)
    return tmp_path


def write(project: Path, config: Sections | str, name: str = "config.ini") -> Path:
    path = project / name
    path.write_text(config if isinstance(config, str) else render(config))
    return path


def load(project: Path, config: Sections | str, cwd: Path | None = None) -> ExpandedConfig:
    path = write(project, config)
    return load_config(str(path), cwd=str(cwd or project))


def problems(project: Path, config: Sections | str, cwd: Path | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(project, config, cwd)
    err = info.value
    # The exception's text is the whole report, one problem per line.
    assert str(err).splitlines() == [str(p) for p in err.problems]
    return err.problems


def find(
    found: list[Problem],
    section: str | None,
    key: str | None,
    value: str | None = None,
    contains: str = "",
) -> Problem:
    for problem in found:
        if (
            problem.section == section
            and problem.key == key
            and (value is None or problem.value == value)
            and contains in problem.message
        ):
            return problem
    raise AssertionError(
        f"no problem for [{section}] {key} = {value!r} containing {contains!r}; got:\n"
        + "\n".join(str(p) for p in found)
    )


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", 1),
        ("-3", -3),
        (" 42 ", 42),
        ("0.8", 0.8),
        ("1e-3", 0.001),
        ("2E2", 200.0),
        (".5", 0.5),
        ("5.", 5.0),
        ("relu", "relu"),
        ("  tanh ", "tanh"),
        ("true", "true"),
        ("None", "None"),
        ("nan", "nan"),
        ("1_000", "1_000"),
        ("0x10", "0x10"),
        ("3 4", "3 4"),
    ],
)
def test_typed_scalar(raw: str, expected: object) -> None:
    result = typed_scalar(raw)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("relu", ["relu"]),
        ("4", [4]),
        ("0.5", [0.5]),
        ("{2-5}", [2, 3, 4, 5]),
        ("{ 2 - 5 }", [2, 3, 4, 5]),
        ("{3-3}", [3]),
        ("{-2-1}", [-2, -1, 0, 1]),
        ("relu, tanh, sigmoid", ["relu", "tanh", "sigmoid"]),
        ("1, 2, {4-6}", [1, 2, 4, 5, 6]),
        ("1, 0.5, relu", [1, 0.5, "relu"]),
        ("{1-2}, {5-6}", [1, 2, 5, 6]),
    ],
)
def test_parse_value(raw: str, expected: list[object]) -> None:
    result = parse_value(raw)
    assert result == expected
    assert [type(v) for v in result] == [type(v) for v in expected]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{5-2}", "range start 5 is greater than end 2; write {2-5}"),
        ("{a-b}", "range bounds must be integers, got 'a' and 'b'"),
        ("{0.1-0.5}", "range bounds must be integers"),
        ("{2-}", "has no end"),
        ("{-}", "has no start"),
        ("{}", "empty range"),
        ("{5}", "needs a start and an end"),
        ("{2-5", "'{' is never closed"),
        ("2-5}", "'}' without a matching '{'"),
        ("{{2-5}}", "nested"),
        ("{1,2}", "',' inside braces"),
        ("x{2-5}", "must be a whole list item"),
        ("1, , 2", "list item 2 is empty"),
        ("1, 2,", "list item 3 is empty"),
        ("", "empty value"),
        ("{1-1000000}", "the limit is"),
    ],
)
def test_parse_value_errors(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_value(raw)
    assert message in str(info.value)


def test_problem_str() -> None:
    problem = Problem(
        "config.ini", "mlp", "width", "{5-2}", "range start 5 is greater than end 2; write {2-5}"
    )
    assert str(problem) == (
        "config.ini [mlp] width = '{5-2}': range start 5 is greater than end 2; write {2-5}"
    )
    assert str(Problem("c.ini", None, None, None, "boom", 3)) == "c.ini:3: boom"
    assert str(Problem("c.ini", "MONITOR", None, None, "missing")) == "c.ini [MONITOR]: missing"


# --------------------------------------------------------------------------------------------
# Expansion


def test_minimal_config_typed_values(project: Path) -> None:
    config = base()
    config["model"].update({"lr_scale": "0.5", "act": "relu", "depth": "2"})
    expanded = load(project, config)
    assert expanded.config_path == str(project / "config.ini")
    assert expanded.warnings == []
    assert expanded.pipelines == [
        [
            {
                "type": "data",
                "class": "Data",
                "path_to_class": str(project / "mod.py"),
                "key": "d_Data",
                "name": "data",
            },
            {
                "type": "model",
                "class": "Model",
                "path_to_class": str(project / "mod.py"),
                "width": 4,
                "lr_scale": 0.5,
                "act": "relu",
                "depth": 2,
                "key": "m_Model",
                "name": "model",
            },
        ]
    ]
    module = expanded.pipelines[0][1]
    # Scheme order first, then parameters in file order, key and name last.
    assert list(module) == [
        "type",
        "class",
        "path_to_class",
        "width",
        "lr_scale",
        "act",
        "depth",
        "key",
        "name",
    ]


def test_process_and_monitor_defaults(project: Path) -> None:
    expanded = load(project, base())
    assert expanded.process == {
        "lr": 0.01,
        "epochs": 3,
        "data_scheme": ["data"],
        "pipeline_scheme": ["model"],
        "loss_function": "MSELoss",
        "run_files_path": str(project / ".runs"),
        "optimizer": "Adam",
        "accuracy": "none",
        "seed": None,
        "deterministic": False,
    }
    assert expanded.monitor == {
        "need_gpu": False,
        "gpu_available": [],
        "nb_processus": 1,
        "multiplicity": 1,
        "retries": 0,
        "timeout": None,
        "max_log_mb": 50.0,
        "ensemble": "auto",
        "ensemble_max": 16,
        "umask": "077",
        "data_cache_mb": 512.0,
        "cache_dir": None,
        "cache_size_mb": 2048.0,
    }
    assert isinstance(expanded.process["lr"], float)


def test_process_and_monitor_explicit(project: Path) -> None:
    config = base()
    config["PROCESS"].update(
        {"lr": "1", "optimizer": "SGD", "accuracy": "ARGMAX", "seed": "42", "run_files_path": "r"}
    )
    config["MONITOR"].update(
        {
            "need_gpu": "Yes",
            "gpu_available": "cuda:0, cuda:1",
            "nb_processus": "4",
            "retries": "2",
            "timeout": "90",
        }
    )
    expanded = load(project, config)
    process, monitor = expanded.process, expanded.monitor
    assert process["lr"] == 1.0 and isinstance(process["lr"], float)
    assert (process["optimizer"], process["accuracy"], process["seed"]) == ("SGD", "argmax", 42)
    assert monitor["need_gpu"] is True
    assert monitor["gpu_available"] == ["cuda:0", "cuda:1"]
    assert (monitor["nb_processus"], monitor["retries"]) == (4, 2)
    assert monitor["timeout"] == 90.0 and isinstance(monitor["timeout"], float)


@pytest.mark.parametrize(
    ("word", "expected"),
    [("true", True), ("TRUE", True), ("yes", True), ("1", True), ("no", False), ("0", False)],
)
def test_need_gpu_spellings(project: Path, word: str, expected: bool) -> None:
    config = base()
    config["MONITOR"]["need_gpu"] = word
    assert load(project, config).monitor["need_gpu"] is expected


@pytest.mark.parametrize("value", ["", "None", "none"])
def test_gpu_available_empty(project: Path, value: str) -> None:
    config = base()
    config["MONITOR"]["gpu_available"] = value
    assert load(project, config).monitor["gpu_available"] == []


@pytest.mark.parametrize(
    ("loss", "accuracy"),
    [
        ("BCELoss", "binary"),
        ("BCEWithLogitsLoss", "logits"),
        ("CrossEntropyLoss", "argmax"),
        ("NLLLoss", "argmax"),
        ("MSELoss", "none"),
        ("HuberLoss", "none"),
    ],
)
def test_accuracy_default_from_loss(project: Path, loss: str, accuracy: str) -> None:
    config = base()
    config["PROCESS"]["loss_function"] = loss
    assert load(project, config).process["accuracy"] == accuracy


def test_class_loss_function(project: Path) -> None:
    (project / "losses.py").write_text("class MyLoss:\n    pass\n")
    config = base()
    del config["PROCESS"]["loss_function"]
    config["PROCESS"].update(
        {"class_loss_function": "MyLoss", "path_to_class_loss_function": "losses.py"}
    )
    process = load(project, config).process
    assert process["loss_function"] is None
    assert process["class_loss_function"] == "MyLoss"
    assert process["path_to_class_loss_function"] == str(project / "losses.py")
    assert process["accuracy"] == "none"


def test_list_and_range_variants_in_file_order(project: Path) -> None:
    config = base()
    config["model"].update({"width": "{2-3}", "act": "relu, tanh"})
    expanded = load(project, config)
    models = [(p[1]["width"], p[1]["act"]) for p in expanded.pipelines]
    # The last parameter of the section varies fastest.
    assert models == [(2, "relu"), (2, "tanh"), (3, "relu"), (3, "tanh")]


def test_alternatives_and_scheme_product(project: Path) -> None:
    config = base()
    config["PROCESS"]["pipeline_scheme"] = "model, head"
    config["data"]["size"] = "10, 20"
    config["other_model"] = {
        "type": "model",
        "class": "Model",
        "path_to_class": "mod.py",
        "depth": "{1-3}",
        "key": "o_{depth}",
    }
    config["head"] = {"type": "head", "class": "Model", "path_to_class": "mod.py", "key": "h"}
    expanded = load(project, config)
    # data: 2 variants; model: 1 (model) + 3 (other_model) alternatives; head: 1.
    assert len(expanded.pipelines) == 2 * 4 * 1
    assert all([m["type"] for m in p] == ["data", "model", "head"] for p in expanded.pipelines)
    names = [p[1]["name"] for p in expanded.pipelines[:4]]
    assert names == ["model", "other_model", "other_model", "other_model"]
    assert [p[1]["key"] for p in expanded.pipelines[:4]] == ["m_Model", "o_1", "o_2", "o_3"]


def test_type_repeated_in_scheme_is_chosen_per_position(project: Path) -> None:
    config = base()
    config["PROCESS"]["pipeline_scheme"] = "model, model"
    config["model"]["width"] = "1, 2"
    expanded = load(project, config)
    assert [(p[1]["width"], p[2]["width"]) for p in expanded.pipelines] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]


def test_multiplicity_repeats_consecutively(project: Path) -> None:
    config = base()
    config["MONITOR"]["multiplicity"] = "3"
    config["model"]["width"] = "1, 2"
    expanded = load(project, config)
    assert [p[1]["width"] for p in expanded.pipelines] == [1, 1, 1, 2, 2, 2]
    # Repetitions are equal but independent objects.
    first, second = expanded.pipelines[0], expanded.pipelines[1]
    assert first == second
    assert first[1] is not second[1]
    first[1]["width"] = 99
    assert second[1]["width"] == 1


def test_key_templates(project: Path) -> None:
    config = base()
    config["model"].update(
        {"lr_scale": "0.5, 1e-3", "key": "{type}-{class}-{name}-w{width}-s{lr_scale}-{ width }"}
    )
    keys = [p[1]["key"] for p in load(project, config).pipelines]
    assert keys == ["model-Model-model-w4-s0.5-4", "model-Model-model-w4-s0.001-4"]


def test_continuation_lines_and_comments(project: Path) -> None:
    text = render(base()).replace(
        "width = 4",
        "; full-line comment\nwidth = 1,\n    2, 3  # inline comment\n  act: relu\n",
    )
    expanded = load(project, text)
    assert [(p[1]["width"], p[1]["act"]) for p in expanded.pipelines] == [
        (1, "relu"),
        (2, "relu"),
        (3, "relu"),
    ]


def test_parameter_names_keep_their_case(project: Path) -> None:
    config = base()
    config["model"]["hiddenSize"] = "8"
    assert load(project, config).pipelines[0][1]["hiddenSize"] == 8


# --------------------------------------------------------------------------------------------
# Warnings


def test_warnings(project: Path) -> None:
    config = base()
    config["PROCESS"]["learning_rate"] = "0.1"
    config["MONITOR"]["colour"] = "blue"
    config["MONITOR"]["gpu_available"] = "cuda:0"
    # A section whose type is not in any scheme is ignored, even if it is otherwise broken.
    config["unused"] = {"type": "extra", "class": "Nope", "path_to_class": "missing.py"}
    expanded = load(project, config)
    assert len(expanded.pipelines) == 1
    text = "\n".join(expanded.warnings)
    assert len(expanded.warnings) == 4
    assert "[PROCESS] learning_rate = '0.1': unknown key, ignored" in text
    assert "[MONITOR] colour = 'blue': unknown key, ignored" in text
    assert "[MONITOR] gpu_available = 'cuda:0': GPUs are listed but need_gpu is false" in text
    assert "[unused] type = 'extra': type 'extra' is not in data_scheme or pipeline_scheme" in (
        text
    )
    assert "section ignored" in text


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nope.ini", cwd=str(tmp_path))
    assert len(info.value.problems) == 1
    assert "nope.ini: config file not found" in str(info.value)
    assert str(tmp_path / "nope.ini") in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "dir.ini").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("dir.ini", cwd=str(tmp_path))
    (tmp_path / "bin.ini").write_bytes(b"[PROCESS]\nlr = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config("bin.ini", cwd=str(tmp_path))


def test_ini_syntax_errors_all_reported(project: Path) -> None:
    text = "orphan = 1\n" + render(base()) + "[broken\nthis line has no delimiter\n = 3\n[]\n"
    found = problems(project, text)
    assert find(found, None, "orphan", contains="before any [section]").line == 1
    broken = find(found, None, None, contains="'[broken' is not closed")
    assert broken.line is not None
    assert "cannot read line 'this line has no delimiter'" in "\n".join(map(str, found))
    assert any("no key name before '='" in p.message for p in found)
    assert any("empty section name" in p.message for p in found)


def test_missing_sections(project: Path) -> None:
    config = base()
    del config["MONITOR"]
    config["process"] = config.pop("PROCESS")
    found = problems(project, config)
    process = find(found, "PROCESS", None, contains="required section is missing")
    assert "found [process], but section names are case-sensitive" in process.message
    assert "config.ini [MONITOR]: required section is missing" in str(found[-1])


@pytest.mark.parametrize("key", ["lr", "epochs", "data_scheme", "pipeline_scheme"])
def test_missing_process_keys(project: Path, key: str) -> None:
    config = base()
    del config["PROCESS"][key]
    problem = find(problems(project, config), "PROCESS", key, contains="required key")
    assert f"config.ini:1 [PROCESS] {key}: required key is missing (" in str(problem)


def test_missing_loss(project: Path) -> None:
    config = base()
    del config["PROCESS"]["loss_function"]
    problem = find(problems(project, config), "PROCESS", "loss_function", contains="missing")
    assert "MSELoss" in problem.message and "class_loss_function" in problem.message


@pytest.mark.parametrize("key", ["need_gpu", "gpu_available", "nb_processus", "multiplicity"])
def test_missing_monitor_keys(project: Path, key: str) -> None:
    config = base()
    del config["MONITOR"][key]
    find(problems(project, config), "MONITOR", key, contains="required key is missing")


@pytest.mark.parametrize("key", ["type", "class", "path_to_class", "key"])
def test_missing_class_keys(project: Path, key: str) -> None:
    config = base()
    del config["model"][key]
    found = problems(project, config)
    find(found, "model", key, contains="required key is missing")
    # The section still declares its type, so the scheme is not also said to lack one.
    if key != "type":
        assert len(found) == 1


def test_scheme_type_without_section(project: Path) -> None:
    config = base()
    config["PROCESS"]["pipeline_scheme"] = "model, head"
    find(
        problems(project, config),
        "PROCESS",
        "pipeline_scheme",
        "model, head",
        "type 'head' has no section; add a section with 'type = head'",
    )


@pytest.mark.parametrize("value", ["", "a, , b", "a b", "{1-2}"])
def test_malformed_scheme(project: Path, value: str) -> None:
    config = base()
    config["PROCESS"]["data_scheme"] = value
    find(problems(project, config), "PROCESS", "data_scheme", value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{5-2}", "range start 5 is greater than end 2; write {2-5}"),
        ("{a-b}", "range bounds must be integers"),
        ("{2-}", "has no end"),
        ("{}", "empty range"),
        ("{2-5", "never closed"),
        ("2, 5}", "without a matching"),
    ],
)
def test_malformed_range_in_section(project: Path, value: str, message: str) -> None:
    config = base()
    config["model"]["width"] = value
    problem = find(problems(project, config), "model", "width", value, message)
    assert f"[model] width = '{value}': " in str(problem)
    assert str(problem).startswith(f"{project / 'config.ini'}:")


def test_unknown_placeholder(project: Path) -> None:
    config = base()
    config["model"]["key"] = "m_{depth}_{width}_{colour}"
    found = problems(project, config)
    depth = find(found, "model", "key", "m_{depth}_{width}_{colour}", "unknown placeholder {depth}")
    assert "available: type, class, name, width" in depth.message
    find(found, "model", "key", contains="unknown placeholder {colour}")
    assert len(found) == 2


@pytest.mark.parametrize(
    ("template", "message"), [("m_{", "unbalanced"), ("m_}", "unbalanced"), ("m_{}", "empty")]
)
def test_malformed_key_template(project: Path, template: str, message: str) -> None:
    config = base()
    config["model"]["key"] = template
    find(problems(project, config), "model", "key", template, message)


@pytest.mark.parametrize("key", ["type", "class", "path_to_class", "key"])
def test_list_in_single_value_key(project: Path, key: str) -> None:
    config = base()
    config["model"][key] = "a, b"
    find(problems(project, config), "model", key, "a, b", "single value")


def test_bad_class_name_and_reserved_parameter(project: Path) -> None:
    config = base()
    config["model"]["class"] = "{2-3}"
    config["model"]["name"] = "x"
    found = problems(project, config)
    find(found, "model", "class", "{2-3}", "expected a Python class name")
    find(found, "model", "name", "x", "reserved")


def test_missing_path_to_class(project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    config = base()
    config["model"]["path_to_class"] = "models/missing.py"
    problem = find(
        problems(project, config, cwd=elsewhere),
        "model",
        "path_to_class",
        "models/missing.py",
        "file not found",
    )
    assert str(elsewhere / "models" / "missing.py") in problem.message
    assert str(project / "models" / "missing.py") in problem.message


def test_path_to_class_directory(project: Path) -> None:
    (project / "pkg").mkdir()
    config = base()
    config["model"]["path_to_class"] = "pkg"
    find(problems(project, config), "model", "path_to_class", "pkg", "is not a file")


def test_class_loss_errors(project: Path) -> None:
    config = base()
    del config["PROCESS"]["loss_function"]
    config["PROCESS"].update(
        {"class_loss_function": "MyLoss", "path_to_class_loss_function": "nope.py"}
    )
    find(
        problems(project, config), "PROCESS", "path_to_class_loss_function", "nope.py", "not found"
    )

    config["PROCESS"]["loss_function"] = "MSELoss"
    find(problems(project, config), "PROCESS", "loss_function", "MSELoss", "not both")

    del config["PROCESS"]["loss_function"]
    del config["PROCESS"]["path_to_class_loss_function"]
    find(
        problems(project, config),
        "PROCESS",
        "path_to_class_loss_function",
        contains="required key is missing",
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "fast", "expected a number"),
        ("lr", "0", "positive"),
        ("lr", "-0.1", "positive"),
        ("lr", "0.1, 0.01", "expected a number"),
        ("epochs", "ten", "expected the number of epochs, an integer >= 1"),
        ("epochs", "2.5", "an integer >= 1"),
        ("epochs", "0", "must be at least 1"),
        ("seed", "abc", "expected an integer seed"),
        ("seed", "-1", "expected an integer seed"),
        ("loss_function", "MSE", "unknown loss 'MSE'"),
        ("loss_function", "mseloss", "did you mean 'MSELoss'"),
        ("loss_function", "__import__('os')", "unknown loss"),
        ("optimizer", "adam", "unknown optimizer 'adam'"),
        ("optimizer", "LBFGS2", "unknown optimizer"),
        ("accuracy", "top5", "unknown accuracy mode; expected one of binary, logits, argmax, none"),
        ("run_files_path", "", "empty path"),
    ],
)
def test_bad_process_values(project: Path, key: str, value: str, message: str) -> None:
    config = base()
    config["PROCESS"][key] = value
    problem = find(problems(project, config), "PROCESS", key, value, message)
    assert f"[PROCESS] {key} = '{value}': " in str(problem)


def test_unknown_optimizer_suggests_correct_case(project: Path) -> None:
    config = base()
    config["PROCESS"]["optimizer"] = "adam"
    find(problems(project, config), "PROCESS", "optimizer", "adam", "did you mean 'Adam'")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("multiplicity", "0", "must be at least 1"),
        ("multiplicity", "-2", "must be at least 1"),
        ("multiplicity", "two", "an integer >= 1"),
        ("nb_processus", "0", "must be at least 1"),
        ("nb_processus", "1.5", "an integer >= 1"),
        ("need_gpu", "maybe", "expected true or false"),
        ("gpu_available", "cuda:0,,cuda:1", "empty GPU name"),
        ("retries", "-1", "must be at least 0"),
        ("timeout", "soon", "positive number of seconds"),
        ("timeout", "0", "positive number of seconds"),
    ],
)
def test_bad_monitor_values(project: Path, key: str, value: str, message: str) -> None:
    config = base()
    config["MONITOR"][key] = value
    problem = find(problems(project, config), "MONITOR", key, value, message)
    assert f"[MONITOR] {key} = '{value}': " in str(problem)


def test_duplicate_sections_and_keys_all_reported(project: Path) -> None:
    text = render(base()) + (
        "[model]\ntype = model\n\n"
        "[data]\nkey = again\n"
        "[dup_keys]\ntype = data\nclass = Data\npath_to_class = mod.py\nkey = k\n"
        "a = 1\na = 2\nb = 1\nb = 3\nkey = k2\n"
    )
    found = problems(project, text)
    find(found, "model", None, contains="duplicate section [model] (first defined at line")
    find(found, "data", None, contains="duplicate section [data]")
    find(found, "dup_keys", "a", "2", "duplicate key 'a' (first set at line")
    find(found, "dup_keys", "b", "3", "duplicate key 'b'")
    find(found, "dup_keys", "key", "k2", "duplicate key 'key'")
    assert len(found) == 5


def test_every_problem_reported_at_once(project: Path) -> None:
    config = base()
    config["PROCESS"]["lr"] = "fast"
    config["PROCESS"]["optimizer"] = "Adamm"
    config["MONITOR"]["multiplicity"] = "0"
    config["data"]["size"] = "{9-1}"
    config["model"]["path_to_class"] = "missing.py"
    config["model"]["key"] = "m_{nope}"
    found = problems(project, config)
    find(found, "PROCESS", "lr", "fast")
    find(found, "PROCESS", "optimizer", "Adamm", "did you mean 'Adam'")
    find(found, "MONITOR", "multiplicity", "0")
    find(found, "data", "size", "{9-1}", "write {1-9}")
    find(found, "model", "path_to_class", "missing.py")
    find(found, "model", "key", "m_{nope}", "unknown placeholder {nope}")
    assert len(found) == 6
    lines = [p.line for p in found]
    assert all(isinstance(line, int) for line in lines)
    assert lines == sorted(lines)  # type: ignore[type-var]


def test_too_many_pipelines(project: Path) -> None:
    config = base()
    config["model"].update({"a": "{1-1000}", "b": "{1-1000}"})
    find(problems(project, config), None, None, contains="expands to 1000000 pipelines")


def test_loss_names_match_torch() -> None:
    torch = pytest.importorskip("torch")
    for name in TORCH_LOSSES:
        assert issubclass(getattr(torch.nn, name), torch.nn.Module), name


# --------------------------------------------------------------------------------------------
# Paths


def test_resolve_path_prefers_cwd(tmp_path: Path) -> None:
    cwd, config_dir = tmp_path / "cwd", tmp_path / "cfg"
    cwd.mkdir()
    config_dir.mkdir()
    (config_dir / "m.py").write_text("")
    assert resolve_path("m.py", str(cwd), str(config_dir), True) == str(config_dir / "m.py")
    (cwd / "m.py").write_text("")
    assert resolve_path("m.py", str(cwd), str(config_dir), True) == str(cwd / "m.py")
    assert resolve_path("x.py", str(cwd), str(config_dir), True) is None
    assert resolve_path("x", str(cwd), str(config_dir), False) == str(cwd / "x")
    absolute = str(config_dir / "m.py")
    assert resolve_path(absolute, str(cwd), "/nowhere", True) == absolute
    assert resolve_path("./sub/../m.py", str(cwd), str(config_dir), True) == str(cwd / "m.py")


def test_path_to_class_resolution_in_config(tmp_path: Path) -> None:
    cwd, config_dir = tmp_path / "cwd", tmp_path / "cfg"
    cwd.mkdir()
    config_dir.mkdir()
    (config_dir / "mod.py").write_text(MODULE_SOURCE)
    write(config_dir, base())

    # Found only beside the config file: the fallback applies.
    expanded = load_config(str(config_dir / "config.ini"), cwd=str(cwd))
    assert expanded.pipelines[0][0]["path_to_class"] == str(config_dir / "mod.py")

    # The same relative name in the cwd wins.
    (cwd / "mod.py").write_text(MODULE_SOURCE)
    expanded = load_config(str(config_dir / "config.ini"), cwd=str(cwd))
    assert expanded.pipelines[0][0]["path_to_class"] == str(cwd / "mod.py")

    # The config path itself is taken relative to the given cwd.
    expanded = load_config("../cfg/config.ini", cwd=str(cwd))
    assert expanded.config_path == str(config_dir / "config.ini")


def test_run_files_path_resolution(tmp_path: Path) -> None:
    cwd, config_dir = tmp_path / "cwd", tmp_path / "cfg"
    cwd.mkdir()
    config_dir.mkdir()
    (config_dir / "mod.py").write_text(MODULE_SOURCE)
    config = base()
    config["PROCESS"]["run_files_path"] = "runs"
    path = str(write(config_dir, config))

    assert load_config(path, cwd=str(cwd)).process["run_files_path"] == str(cwd / "runs")
    (config_dir / "runs").mkdir()
    assert load_config(path, cwd=str(cwd)).process["run_files_path"] == str(config_dir / "runs")
    (cwd / "runs").mkdir()
    assert load_config(path, cwd=str(cwd)).process["run_files_path"] == str(cwd / "runs")


def test_default_cwd_is_process_cwd(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(project, base())
    monkeypatch.chdir(project)
    assert load_config("config.ini").config_path == str(project / "config.ini")


# --------------------------------------------------------------------------------------------
# JSON


def test_pipelines_to_json_seed_shape(project: Path) -> None:
    config = base()
    config["model"]["width"] = "1, 0.5, relu"
    expanded = load(project, config)
    text = pipelines_to_json(expanded.pipelines)
    data = json.loads(text)
    assert data == expanded.pipelines
    assert [m["width"] for p in data for m in p if m["type"] == "model"] == [1, 0.5, "relu"]
    assert text.startswith("[\n  [\n    {\n")


# --------------------------------------------------------------------------------------------
# Property: the number of pipelines


def _value_strategy() -> st.SearchStrategy[tuple[str, int]]:
    """A parameter value as written in the file, with the number of values it expands to."""
    word = st.sampled_from(["relu", "tanh", "x_1", "Adam"])
    number = st.one_of(
        st.integers(-50, 50).map(str), st.sampled_from(["0.5", "1e-3", "2.0", "-0.25"])
    )
    single = st.one_of(word, number).map(lambda v: (v, 1))
    ranges = st.tuples(st.integers(-5, 20), st.integers(0, 3)).map(
        lambda t: (f"{{{t[0]}-{t[0] + t[1]}}}", t[1] + 1)
    )
    item = st.one_of(single, ranges)
    lists = st.lists(item, min_size=2, max_size=3).map(
        lambda items: (", ".join(v for v, _ in items), sum(n for _, n in items))
    )
    return st.one_of(single, ranges, lists)


@st.composite
def random_config(draw: st.DrawFn) -> tuple[Sections, int]:
    pool = ["a", "b", "c"]
    data_scheme = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    pipeline_scheme = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    multiplicity = draw(st.integers(1, 3))
    sections: Sections = {
        "PROCESS": {
            "lr": "0.1",
            "epochs": "1",
            "data_scheme": ", ".join(data_scheme),
            "pipeline_scheme": ", ".join(pipeline_scheme),
            "loss_function": "MSELoss",
        },
        "MONITOR": {
            "need_gpu": "no",
            "gpu_available": "",
            "nb_processus": "2",
            "multiplicity": str(multiplicity),
        },
    }
    variants_per_type: dict[str, int] = {}
    for type_name in dict.fromkeys(data_scheme + pipeline_scheme):
        total = 0
        for index in range(draw(st.integers(1, 2))):
            entries = {"type": type_name, "class": "Model", "path_to_class": "mod.py"}
            count = 1
            for param in range(draw(st.integers(0, 2))):
                value, n = draw(_value_strategy())
                entries[f"p{param}"] = value
                count *= n
            entries["key"] = "k_{class}" + "".join(
                f"_{{{p}}}" for p in entries if p.startswith("p") and p != "path_to_class"
            )
            sections[f"{type_name}{index}"] = entries
            total += count
        variants_per_type[type_name] = total
    expected = multiplicity * math.prod(variants_per_type[t] for t in data_scheme + pipeline_scheme)
    # Keeps each example fast; the count formula is exercised just as well by small studies.
    assume(expected <= 3000)
    return sections, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_config())
def test_pipeline_count_property(case: tuple[Sections, int]) -> None:
    sections, expected = case
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "mod.py").write_text(MODULE_SOURCE)
        path = write(root, sections)
        expanded = load_config(str(path), cwd=directory)
    assert len(expanded.pipelines) == expected
    positions = expanded.process["data_scheme"] + expanded.process["pipeline_scheme"]
    multiplicity = expanded.monitor["multiplicity"]
    for index, pipeline in enumerate(expanded.pipelines):
        assert [module["type"] for module in pipeline] == positions
        # Repetitions of one pipeline are consecutive.
        assert pipeline == expanded.pipelines[index - index % multiplicity]


# --------------------------------------------------------------------------------------------
# CLI and import cost


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_generate_writes_seed_json(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = _cli(["generate", str(EXAMPLE / "config.ini"), str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = load_config(str(EXAMPLE / "config.ini"), cwd=str(tmp_path)).pipelines
    assert json.loads(out.read_text()) == expected


def test_cli_generate_broken_config(project: Path) -> None:
    config = base()
    config["PROCESS"]["epochs"] = "many"
    config["model"]["width"] = "{5-2}"
    config["model"]["key"] = "m_{nope}"
    path = write(project, config)
    expected = problems(project, config)
    assert len(expected) == 3
    out = project / "out.json"
    result = _cli(["generate", str(path), str(out)], cwd=project)
    assert result.returncode != 0
    for problem in expected:
        assert str(problem) in result.stderr
    assert not out.exists()


def test_config_import_pulls_no_heavy_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import mosaic_client.config"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "mosaic_client.config" in imported
    heavy = {name for name in imported if name.split(".")[0] in ("torch", "matplotlib", "numpy")}
    assert heavy == set()


# --------------------------------------------------------------------------------------------
# The OR/AND example


def test_example_config_expands() -> None:
    expanded = load_config(str(EXAMPLE / "config.ini"), cwd=str(REPO))
    assert expanded.warnings == []
    assert len(expanded.pipelines) == 2 * (4 + 4) * 2
    assert expanded.process["loss_function"] == "BCELoss"
    assert expanded.process["accuracy"] == "binary"
    assert expanded.process["seed"] == 0
    assert expanded.monitor["multiplicity"] == 2
    keys = {(p[0]["key"], p[1]["key"]) for p in expanded.pipelines}
    assert keys == {
        (data, model)
        for data in ("data_dataset_OR", "data_dataset_AND")
        for model in ("mlp_mlp_funnel", "mlp_mlp_brick")
    }
    for pipeline in expanded.pipelines:
        for module in pipeline:
            assert module["path_to_class"].startswith(str(EXAMPLE))


def _load_class(module: dict[str, Any]) -> type:
    spec = importlib.util.spec_from_file_location(
        f"example_{module['name']}", module["path_to_class"]
    )
    assert spec is not None and spec.loader is not None
    loaded: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, module["class"])


def _construct(cls: type, *sources: dict[str, Any]) -> Any:
    # The daemon fills constructor parameters by name from earlier info() dicts, then the
    # module's own section; this mimics that for the test.
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls).parameters.items():
        for source in sources:
            if name in source:
                kwargs[name] = source[name]
                break
        else:
            assert parameter.default is not inspect.Parameter.empty, name
    return cls(**kwargs)


def test_example_classes_train_one_step(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    expanded = load_config(str(EXAMPLE / "config.ini"), cwd=str(REPO))
    seen: set[str] = set()
    for pipeline in expanded.pipelines:
        data_module, model_module = pipeline
        if (data_module["class"], model_module["class"]) in seen:
            continue
        seen.add((data_module["class"], model_module["class"]))

        torch.manual_seed(0)
        dataset = _construct(_load_class(data_module), data_module)
        info = dataset.info()
        assert info == {"batch_size": 20, "input_size": 2, "output_size": 1}
        train, test = dataset.prepare(None, dict(info), data_module)
        x, y = next(iter(train))
        assert x.shape == (20, 2) and y.shape == (20, 1) and y.dtype == torch.float32
        assert set(y.flatten().tolist()) <= {0.0, 1.0}
        assert sum(len(b[0]) for b in train) == 160 and sum(len(b[0]) for b in test) == 40

        model = _construct(_load_class(model_module), info, model_module)
        assert model.info() == {}
        optimizer = torch.optim.Adam(model.parameters(), lr=expanded.process["lr"])
        before = [p.detach().clone() for p in model.parameters()]
        prediction = model.forward(x, dict(info), model_module)
        assert prediction.shape == (20, 1)
        assert float(prediction.detach().min()) >= 0.0 and float(prediction.detach().max()) <= 1.0
        loss = torch.nn.BCELoss()(prediction, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

        # save_model/load_model really restore the weights into a fresh instance.
        path = str(tmp_path / f"model_{model_module['class']}_1")
        model.save_model(path)
        assert os.path.exists(path + ".pt")
        torch.manual_seed(123)
        fresh = _construct(_load_class(model_module), info, model_module)
        fresh.load_model(path)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert len(seen) == 4


def test_example_data_is_deterministic_given_seed() -> None:
    torch = pytest.importorskip("torch")
    expanded = load_config(str(EXAMPLE / "config.ini"), cwd=str(REPO))
    module = expanded.pipelines[0][0]
    cls = _load_class(module)

    def draw(seed: int) -> list[Any]:
        torch.manual_seed(seed)
        train, test = _construct(cls, module).prepare(None, {}, module)
        return [b for loader in (train, test) for b in loader]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_the_original_cache_keys_are_read_as_mosaic_s_with_a_note(project: Path) -> None:
    config = base()
    config["MONITOR"]["cache_database_path"] = "cache"
    config["MONITOR"]["cache_size"] = "300"
    expanded = load(project, config)
    assert expanded.monitor["cache_dir"] == str(project / "cache")
    assert expanded.monitor["cache_size_mb"] == 300.0
    text = "\n".join(expanded.warnings)
    assert "the original tool's key, read as cache_dir = " in text
    assert "read as cache_size_mb = 300.0 MiB" in text
    # Mosaic's own key wins, and the original's is said to be ignored.
    config["MONITOR"]["cache_size_mb"] = "50"
    expanded = load(project, config)
    assert expanded.monitor["cache_size_mb"] == 50.0
    assert "ignored: cache_size_mb is given" in "\n".join(expanded.warnings)


def test_deterministic_trains_every_run_alone(project: Path) -> None:
    config = base()
    config["PROCESS"]["deterministic"] = "true"
    assert load(project, config).monitor["ensemble"] == "off"
    config["MONITOR"]["ensemble"] = "auto"
    expanded = load(project, config)
    assert expanded.monitor["ensemble"] == "off"
    assert "deterministic = true trains every run alone" in "\n".join(expanded.warnings)
    config["PROCESS"]["deterministic"] = "false"
    assert load(project, config).monitor["ensemble"] == "auto"
