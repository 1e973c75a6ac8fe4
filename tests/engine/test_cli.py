"""The command line's own messages and exit codes, through its entry point (`cli.main.main`, and the real
command line in a subprocess where the exit status as a shell sees it matters): mistakes read as what they
are, usage errors exit 2 with argparse's usage line, and `inspect` shows the plan without writing anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from adapter_merge.cli.main import main
from adapter_merge.core.settings import Settings
from tests.builders import CASES
from tests.engine.conftest import Inputs, Workspace
from tests.engine.test_bad_input import assert_refused, run_cli, run_main

EXIT_USAGE = 2


def usage_error(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command line that must be a usage error: exit 2, and stderr (usage line + one message)."""
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in argv])
    assert caught.value.code == EXIT_USAGE
    stderr = capsys.readouterr().err
    assert stderr.startswith("usage: adapter-merge "), stderr
    return stderr


# --- the progress bar ---------------------------------------------------------------------------------------


def test_merge_shows_a_bar_with_rate_and_eta_on_a_terminal(inputs: Inputs) -> None:
    """On a terminal (a pseudo-terminal here) the merge draws tqdm's bar over the output bytes to 100%; piped,
    stderr stays free of it."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a width
    try:
        done = subprocess.run([sys.executable, "-m", "adapter_merge.cli", "merge", str(inputs.base), str(inputs.lora),
                               "--out", str(inputs.out)], stderr=terminal, stdout=subprocess.DEVNULL, timeout=120,
                              check=False)
        os.close(terminal)
        terminal = -1
        drawn = _read_all(controller).decode(errors="replace")
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert done.returncode == 0
    assert "merging: 100%" in drawn and "B/s]" in drawn, drawn
    piped = subprocess.run([sys.executable, "-m", "adapter_merge.cli", "merge", str(inputs.base), str(inputs.lora),
                            "--out", str(inputs.out.with_name("piped"))], capture_output=True, text=True, timeout=120,
                           check=False)
    assert piped.returncode == 0 and "merging" not in piped.stderr


def _read_all(fd: int) -> bytes:
    """Everything written to a pseudo-terminal whose other side is closed (Linux then raises EIO)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# --- mistakes that read as what they are -------------------------------------------------------------------


def test_base_and_adapter_swapped(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = run_main([inputs.lora, inputs.base], inputs.out, capsys)
    assert_refused(code, stderr, ("is not a base model: it has no config.json (it looks like an adapter",),
                   inputs.out_parent)


def test_adapter_that_is_a_base(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = run_main([inputs.base, inputs.base], inputs.out, capsys)
    assert_refused(code, stderr, ("is not a PEFT adapter: it has no adapter_config.json (it looks like a base "
                                  "model",), inputs.out_parent)


def test_file_given_as_the_base(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = run_main([inputs.base / "model.safetensors", inputs.lora], inputs.out, capsys)
    assert_refused(code, stderr, ("model.safetensors: is a file, not a folder",), inputs.out_parent)
    assert "not found" not in stderr


def test_existing_output_names_the_overwrite_flag(inputs: Inputs) -> None:
    inputs.out.mkdir()
    result = run_cli(inputs.base, inputs.lora, out=inputs.out)
    assert_refused(result.returncode, result.stderr, ("already exists; pass --overwrite to replace it",),
                   inputs.out_parent, left=[inputs.out.name])


# --- usage errors: exit 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-shard-size", "5XB"], "argument --max-shard-size: max_shard_size: '5XB' is not a size"),
    (["--max-shard-size", "0"], "argument --max-shard-size: max_shard_size: must be positive"),
    (["--weights", "1.0,0.5"], "argument --weights: 2 weights given for 1 adapters"),
    (["--weights", "1.0,half"], "argument --weights: '1.0,half' is not a comma-separated list of numbers"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
], ids=["shard_size_unit", "shard_size_zero", "weights_count", "weights_not_numbers", "dtype"])
@pytest.mark.parametrize("command", ["merge", "inspect"])
def test_bad_arguments_are_usage_errors(inputs: Inputs, capsys: pytest.CaptureFixture[str], command: str,
                                        args: list[str], needle: str) -> None:
    out = ["--out", inputs.out] if command == "merge" else []
    stderr = usage_error([command, inputs.base, inputs.lora, *out, *args], capsys)
    assert f"adapter-merge {command}: error: {needle}" in stderr
    assert os.listdir(inputs.out_parent) == []


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "99999"], ["serve", "--port", "http"], ["serve", "--fd", "999"],
    ["worker", "--concurrency", "0"],
], ids=["port_range", "port_word", "fd_not_a_socket", "concurrency_zero"])
def test_bad_server_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert f"error: argument {argv[1]}: {argv[2]!r} is not" in usage_error(argv, capsys)


def test_usage_error_through_the_real_command_line(inputs: Inputs) -> None:
    result = run_cli(inputs.base, inputs.lora, "--weights", "1,2,3", out=inputs.out)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines()[-1] == ("adapter-merge merge: error: argument --weights: 3 weights given for "
                                              "1 adapters")


# --- help ----------------------------------------------------------------------------------------------------


def test_dtype_help_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["merge", "--help"])
    assert caught.value.code == 0
    assert "one of auto, bfloat16, float16, float32" in " ".join(capsys.readouterr().out.split())


def test_serve_help_names_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "README's Settings table" in help_text
    assert all(f"MERGE_{name.upper()} " in help_text for name in Settings.model_fields)


# --- inspect -------------------------------------------------------------------------------------------------


def _inspect(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("case_name", "kinds"), [
    ("llama_stacked", [{"lora": 14}, {"dora": 14}]),
    # q_proj x2 and lm_head; the embedding LoRA; both embeddings saved whole beside it (save_embedding_layers)
    ("llama_embedding_lora", [{"lora": 3, "embedding": 1, "replaced": 2}]),
    ("llama_trainable_tokens", [{"lora": 4, "trainable_tokens": 1}]),
    ("bert_lora_bias", [{"lora": 6, "lora_bias": 6}]),
    ("bert_cls_head", [{"lora": 2, "replaced": 2}]),  # the classifier's weight and bias (modules_to_save)
])
def test_inspect_says_what_each_adapter_touches(workspace: Workspace, capsys: pytest.CaptureFixture[str],
                                                case_name: str, kinds: list[dict[str, int]]) -> None:
    case = CASES[case_name]
    base, adapters = workspace.inputs(case)
    before = sorted(p.relative_to(base.parent) for p in base.parent.rglob("*"))
    code, out, err = _inspect([base, *(path for path, _ in adapters), "--json"], capsys)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert [adapter["kinds"] for adapter in report["adapters"]] == kinds
    assert sorted(p.relative_to(base.parent) for p in base.parent.rglob("*")) == before  # nothing written


def test_inspect_text_shows_dtype_size_shards_and_files(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    (inputs.base / "pytorch_model.bin").write_bytes(b"stale")
    code, out, err = _inspect([inputs.base, inputs.lora, inputs.dora, "--weights", "1,0.5", "--dtype", "float32",
                               "--max-shard-size", "20KB"], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"base: {inputs.base} (llama, ")
    assert lines[1].startswith(f"adapter 0: {inputs.lora} (weight 1, r=4, lora_alpha=8): 14 tensors in 14 modules: "
                               "LoRA 14")
    assert lines[2].startswith(f"adapter 1: {inputs.dora} (weight 0.5, r=4, lora_alpha=8): 14 tensors in 14 modules: "
                               "DoRA 14")
    assert lines[3].startswith("output: dtype float32 (F32 x")
    assert "  model-00001-of-00005.safetensors: " in out
    assert "copied: generation_config.json, special_tokens_map.json, tokenizer.json, tokenizer_config.json" in out
    assert "skipped: pytorch_model.bin: weights: they hold the unmerged model" in out
    assert os.listdir(inputs.out_parent) == []


def test_inspect_refuses_as_merge_does(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _inspect([inputs.lora, inputs.base], capsys)
    assert code == 1 and out == ""
    assert err.startswith("adapter-merge: error: ") and "looks like an adapter" in err


def test_inspect_needs_no_torch(inputs: Inputs, tmp_path: Path) -> None:
    """The plan is made from headers and configs: the command runs where torch is not even importable."""
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is not to be imported')\n")
    result = subprocess.run([sys.executable, "-c", "import sys; from adapter_merge.cli.main import main; "
                             "sys.exit(main(sys.argv[1:]))", "inspect", str(inputs.base), str(inputs.lora)],
                            env={**os.environ, "PYTHONPATH": str(blocker)}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "adapter 0:" in result.stdout
