"""Nonsense configs and command lines: each is a one-line error and exit 2 before any process group starts
(no traceback), or, where the input has an obvious meaning, it is understood."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR
from hgrn_megatron.pretrain.__main__ import main
from hgrn_megatron.pretrain.config import load_config

from .harness import ASSETS, HGRN_PRETRAIN, tiny_config

pytestmark = pytest.mark.faults


def _dry_run(capsys, config, *args) -> tuple[int, str]:
    code = main(["--config", str(config), "--dry-run", *args])
    captured = capsys.readouterr()
    return code, captured.err if code else captured.out


@pytest.mark.parametrize("override, expected", [
    ("train.steps=[1,", "override 'train.steps=[1,': not a valid YAML value"),
    ("train.steps=*foo", "override 'train.steps=*foo': not a valid YAML value (found undefined alias 'foo')"),
    ("train.steps=!!python/object/apply:os.getpid []", "could not determine a constructor for the tag"),
    ("optimizer.beta1=2", "optimizer.beta1: Input should be less than 1 (got 2)"),
    ("optimizer.beta2=-0.1", "optimizer.beta2: Input should be greater than or equal to 0 (got -0.1)"),
    ("optimizer.eps=-1", "optimizer.eps: Input should be greater than 0 (got -1)"),
    ("train.preemption_signals=[SIGFOO]", "train.preemption_signals: unknown signal 'SIGFOO'"),
    ("train.preemption_signals=[SIGUSR1, SIGKILL]", "SIGKILL cannot be caught"),
    ("optimizer.lr=.inf", "optimizer.lr: must be a finite number (got inf)"),
    ("optimizer.clip_grad=.nan", "optimizer.clip_grad: must be a finite number (got nan)"),
    ("parallel.deepspeed_extra={optimizer: {params: {lr: -.inf}}}",
     "parallel.deepspeed_extra.optimizer.params.lr: must be a finite number (got -inf)"),
])
def test_bad_values_are_one_line_errors_even_in_a_dry_run(capsys, tmp_path, override, expected):
    code, err = _dry_run(capsys, tiny_config(tmp_path), override)
    assert code == EXIT_CONFIG_ERROR, err
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the header and the one problem


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_no_yaml_tag_constructs_an_object(capsys, tmp_path, tag):
    """The config file and the overrides are read with yaml.safe_load: a python/* tag is an error, and the
    command in it never runs."""
    marker = tmp_path / "ran"
    payload = f"{tag} ['touch {marker}']"
    config = tiny_config(tmp_path)
    for override in (f"train.seed={payload}", f"run_dir={payload}", f"data.train_shards=[{payload}]"):
        code, err = _dry_run(capsys, config, override)
        assert code == EXIT_CONFIG_ERROR and "constructor" in err and "Traceback" not in err
    config.write_text(config.read_text() + f"extra: {payload}\n")
    code, err = _dry_run(capsys, config)
    assert code == EXIT_CONFIG_ERROR and "not valid YAML" in err and "constructor" in err
    assert not marker.exists()


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    config = tiny_config(tmp_path)
    config.write_bytes(config.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    code, err = _dry_run(capsys, config)
    assert code == EXIT_CONFIG_ERROR
    assert f"{config}: not UTF-8 text (byte 0xe9 at offset" in err


def test_a_check_of_the_whole_config_names_its_fields_without_an_empty_location(capsys, tmp_path):
    code, err = _dry_run(capsys, tiny_config(tmp_path), "train.global_batch_size=5", "train.micro_batch_size=2")
    assert code == EXIT_CONFIG_ERROR
    assert err.splitlines()[1] == "train.global_batch_size (5) is not a multiple of train.micro_batch_size (2)"


def test_overrides_and_flags_in_any_order(capsys, tmp_path):
    config = tiny_config(tmp_path)
    assert main(["--config", str(config), "train.steps=7", "--print-config", "train.seed=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["train"]["steps"], resolved["train"]["seed"]) == (7, 3)
    assert main(["train.steps=9", "--config", str(config), "--dry-run", "optimizer.lr=1e-3"]) == 0
    assert "in 9 steps" in capsys.readouterr().out


def test_a_config_file_without_config_and_no_arguments_at_all(capsys, tmp_path):
    config = tiny_config(tmp_path)
    assert main([str(config)]) == EXIT_CONFIG_ERROR
    assert f"is not an override (key.sub=value); to train with the config file, pass it as --config {config}" in \
        capsys.readouterr().err
    assert main([]) == EXIT_CONFIG_ERROR
    assert "no config given: hgrn-pretrain --config FILE.yaml" in capsys.readouterr().err


def test_one_path_for_a_list_of_paths_and_globs_with_brackets(tmp_path):
    config = tiny_config(tmp_path)
    shards = ASSETS / "pile-mini"
    one = load_config(config, [f"data.train_shards={shards}/train-00.jsonl.zst"])
    assert one.data.train_shards == [f"{shards}/train-00.jsonl.zst"]
    bracket = load_config(config, [f"data.train_shards=[{shards}/train-0[01].jsonl.zst, {shards}/train-02*]"])
    assert bracket.data.train_shards == [f"{shards}/train-0[01].jsonl.zst", f"{shards}/train-02*"]
    paths, _, _ = bracket.data.resolve_train()
    assert [p.name for p in paths] == ["train-00.jsonl.zst", "train-01.jsonl.zst", "train-02.jsonl.zst"]
    star = load_config(config, ["data.valid_shards=*.zst", "train.preemption_signals=SIGUSR1", "run_dir=runs/[a]"])
    assert (star.data.valid_shards, star.train.preemption_signals, star.run_dir) == (["*.zst"], ["SIGUSR1"],
                                                                                   "runs/[a]")
    assert load_config(config, ["data.valid_shards=['a,b', c]"]).data.valid_shards == ["a,b", "c"]


def _start(config, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([HGRN_PRETRAIN, "--config", str(config), *overrides], check=False, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("tokenizer, expected", [
    ("missing/tokenizer.model", "tokenizer.model: tokenizer model missing/tokenizer.model does not exist"),
    (str(ASSETS / "pile-mini" / "val.jsonl.zst"), "metadata file missing"),
])
def test_a_missing_or_wrong_tokenizer_stops_before_any_process_group(tmp_path, tokenizer, expected):
    result = _start(tiny_config(tmp_path), f"tokenizer.model={tokenizer}")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()  # nothing was started, nothing written


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    result = _start(tiny_config(tmp_path), f"run_dir={tmp_path}/taken/run")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert f"run_dir: {tmp_path}/taken is a file, not a directory (so {tmp_path}/taken/run cannot be created)" in \
        result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_python_m_and_the_console_script_agree(tmp_path):
    config = tiny_config(tmp_path)
    for cmd in ([HGRN_PRETRAIN], [sys.executable, "-m", "hgrn_megatron.pretrain"]):
        result = subprocess.run([*cmd, "--config", str(config), "--print-config", "optimizer.lr=.inf"], check=False,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == EXIT_CONFIG_ERROR and "optimizer.lr: must be a finite number" in result.stderr
