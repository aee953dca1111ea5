"""The command line through its real entry point: clear messages, exit codes, never a traceback."""

import json
import zlib

import pytest

from tests.conftest import write


def test_prepare_and_inspect_synthetic(tmp_path, run_cli):
    out = tmp_path / "ds"
    code, stdout, stderr = run_cli(
        "prepare",
        "--source",
        "synthetic",
        "--synthetic-users",
        "30",
        "--out",
        out,
        "--max-history",
        "20",
        "--seed",
        "5",
    )
    assert code == 0, stderr
    assert "split_min_events" in stdout and "prepared" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["synthetic"]["num_users"] == 30 and manifest["config"]["max_history"] == 20
    code, stdout, _ = run_cli("inspect", out, "--users", "1", "--events", "3")
    assert code == 0 and "user u00000" in stdout and "test" in stdout
    code, stdout, _ = run_cli("inspect", out, "--json")
    assert code == 0 and json.loads(stdout) == manifest


def test_refuses_to_overwrite(tmp_path, run_cli):
    args = ("prepare", "--source", "synthetic", "--synthetic-users", "10", "--out", tmp_path / "ds")
    assert run_cli(*args)[0] == 0
    code, _, stderr = run_cli(*args)
    assert code == 2 and "already exists; pass --force" in stderr and "Traceback" not in stderr
    assert run_cli(*args, "--force")[0] == 0


def test_strict_exit_2_names_file_line_field(ml100k_dir, tmp_path, run_cli):
    code, _, stderr = run_cli("prepare", "--source", "movielens", ml100k_dir, "--out", tmp_path / "x", "--strict")
    assert code == 2
    assert "u.data:12: wrong field count: expected 4 fields" in " ".join(stderr.split())
    assert "Traceback" not in stderr and not (tmp_path / "x").exists()


def test_lenient_reports_skips(ml100k_dir, tmp_path, run_cli):
    code, stdout, _ = run_cli("prepare", "--source", "movielens", ml100k_dir, "--out", tmp_path / "x")
    assert code == 0 and "non-numeric rating" in stdout and "bad timestamp" in stdout


def test_user_errors_are_messages(tmp_path, run_cli):
    cases = [
        (("prepare", "--source", "movielens", tmp_path / "missing", "--out", tmp_path / "o"), "does not exist"),
        (("prepare", "--source", "amazon", "--out", tmp_path / "o"), "needs at least one input path"),
        (("prepare", "--source", "netflix", "--out", tmp_path / "o"), "source: Input should be"),
        (("prepare", "--source", "synthetic", "--max-history", "0", "--out", tmp_path / "o"), "max_history"),
        (("prepare", "--source", "synthetic", "--min-user-events", "100000", "--out", tmp_path / "o"), "k_core"),
        (("inspect", tmp_path), "is not a prepared dataset"),
        (("prepare", "--config", tmp_path / "none.yaml"), "config file not found"),
    ]
    for args, message in cases:
        code, _, stderr = run_cli(*args)
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr


def test_corrupt_gzip_is_a_message(tmp_path, run_cli):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    write(tmp_path / "ml" / "u.item", "1|A (1990)|x||u|" + "|".join(["0"] * 19) + "\n")
    code, _, stderr = run_cli("prepare", "--source", "movielens", tmp_path / "ml", "--out", tmp_path / "o")
    assert code != 0 and "u.data.gz" in stderr and "Traceback" not in stderr


def test_yaml_config_with_flag_override(tmp_path, run_cli):
    cfg = write(tmp_path / "c.yaml", "source: synthetic\nmax_history: 9\nsynthetic:\n  num_users: 12\n  seed: 4\n")
    code, _, stderr = run_cli("prepare", "--config", cfg, "--max-history", "11", "--out", tmp_path / "d")
    assert code == 0, stderr
    resolved = json.loads((tmp_path / "d" / "manifest.json").read_text())["config"]
    assert resolved["max_history"] == 11 and resolved["synthetic"]["num_users"] == 12
    write(tmp_path / "bad.yaml", "max_histroy: 3\n")
    code, _, stderr = run_cli("prepare", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "e")
    assert code == 2 and "max_histroy: Extra inputs are not permitted" in stderr


@pytest.mark.parametrize(
    "raised,code,message",
    [
        (
            EOFError("Compressed file ended before the end-of-stream marker was reached"),
            2,
            "an input ended before it was complete",
        ),
        (
            zlib.error("invalid stored block lengths"),
            2,
            "a compressed input is corrupt (error: invalid stored block lengths)",
        ),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "not valid utf-8 text at byte 0"),
        (KeyboardInterrupt(), 130, "interrupted: outputs are only ever renamed into place"),
        (BrokenPipeError(32, "Broken pipe"), 1, "the output pipe was closed"),
    ],
)
def test_low_level_exceptions_are_messages_not_aborted(tmp_path, run_cli, monkeypatch, raised, code, message):
    """What click/typer would print as a bare ``Aborted.`` (EOFError) or swallow (KeyboardInterrupt, a broken
    pipe) is one message and its own exit code, from any command."""
    import userllm.data.prepare

    def fail(cfg):
        raise raised

    monkeypatch.setattr(userllm.data.prepare, "prepare_dataset", fail)
    got, _, stderr = run_cli("prepare", "--source", "synthetic", "--out", tmp_path / "o")
    said = " ".join(stderr.split())
    assert got == code and message in said, said
    assert "Aborted" not in said and "Traceback" not in stderr
