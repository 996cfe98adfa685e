"""Bad user input: CLIs print it as one line, never a traceback. Defined in model/errors.py, the
bottom layer, so that model/, pipeline/, train/ and tools/ all raise the same type."""
from model.errors import UserError

__all__ = ["UserError", "run_resumable_cli"]


def run_resumable_cli(body) -> int:
    """The exit protocol of the resumable CLIs (teacher_dump, regenerate): `body()` returns the
    summary dict, printed as one JSON line (exit 0), or an int exit code to return as is. Bad
    input is one `error:` line (exit 2); SIGTERM stops after a commit and says so (exit 75);
    Ctrl-C says how to resume (exit 130), since both commit by atomic rename and a rerun
    continues from the last commit."""
    import json
    import sys

    from pipeline.preempt import PREEMPTED_EXIT, Preempted

    try:
        summary = body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM: stopped after a commit (pipeline/preempt.py)
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the last commit",
              file=sys.stderr)
        return 130
    if isinstance(summary, int):
        return summary
    print(json.dumps(summary), flush=True)
    return 0
