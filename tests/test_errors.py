import pytest

from userllm.errors import InputError, run_script


def test_run_script_turns_a_user_error_into_a_message_and_its_exit_code(capsys):
    def main() -> None:
        raise InputError("runs/x is not a pretraining run")

    with pytest.raises(SystemExit) as e:
        run_script(main)
    assert e.value.code == InputError.exit_code == 2
    assert capsys.readouterr().err == "error: runs/x is not a pretraining run\n"


def test_run_script_lets_other_errors_through():
    def main() -> None:
        raise ValueError("a bug, with its traceback")

    with pytest.raises(ValueError, match="a bug"):
        run_script(main)
