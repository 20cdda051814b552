"""output/failure: SageMaker shows its first FAILURE_REASON_LIMIT characters as the job's FailureReason."""

from trainer import sagemaker
from trainer.sagemaker import FAILURE_REASON_CUT, FAILURE_REASON_LIMIT, failure_reason, write_failure


def _write(tmp_path, message: str) -> str:
    path = write_failure(message, environ={"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert path == tmp_path / "output" / "failure"
    return path.read_text(encoding="utf-8")


def test_a_message_within_the_limit_is_written_as_it_is(tmp_path):
    message = "ConfigError: hyperparameter 'lora_r': 0 must be at least 1\n\n" + "x" * 900
    message += "y" * (FAILURE_REASON_LIMIT - len(message))
    assert len(message) == FAILURE_REASON_LIMIT
    assert failure_reason(message) == message
    assert _write(tmp_path, message) == message


def test_a_longer_message_starts_with_its_cut_reason_and_follows_in_full(tmp_path):
    first_line = "Framework error: RuntimeError: " + "shape mismatch " * 100  # longer than the limit by itself
    message = first_line + "\n\nTraceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 200
    reason = failure_reason(message)
    assert len(reason) == FAILURE_REASON_LIMIT and reason.endswith(FAILURE_REASON_CUT)
    assert reason == message[: FAILURE_REASON_LIMIT - len(FAILURE_REASON_CUT)] + FAILURE_REASON_CUT
    written = _write(tmp_path, message)
    assert written[:FAILURE_REASON_LIMIT] == reason  # what SageMaker shows
    assert written == reason + "\n\n" + message  # nothing lost for whoever reads the file
    assert written.splitlines()[0] == reason


def test_a_short_reason_with_a_long_traceback_keeps_the_reason_on_the_first_line(tmp_path):
    message = "Framework error: OSError: [Errno 28] No space left on device\n\n" + "frame\n" * 500
    written = _write(tmp_path, message)
    assert written.splitlines()[0] == "Framework error: OSError: [Errno 28] No space left on device"
    assert written[:FAILURE_REASON_LIMIT].endswith(FAILURE_REASON_CUT)


def test_the_first_failure_wins(tmp_path):
    environ = {"SAGEMAKER_BASE_DIR": str(tmp_path)}
    write_failure("DataError: the first", environ)
    write_failure("Framework error: a consequence", environ)
    assert (tmp_path / "output" / "failure").read_text() == "DataError: the first"
    sagemaker.clear_failure(environ)
    assert not (tmp_path / "output" / "failure").exists()
