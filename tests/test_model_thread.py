"""The app's model thread: every call lands on the same thread, results and errors come back."""
import threading

import pytest

from app.model_thread import ModelThread


def test_calls_from_several_threads_run_on_one_thread():
    mt = ModelThread()
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(mt.run(threading.get_ident))) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(seen) == 4 and len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    mt.close()


def test_result_error_and_nested_call():
    mt = ModelThread()
    assert mt.run(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad input"):
        mt.run(lambda: (_ for _ in ()).throw(ValueError("bad input")))
    # a model call made by model work runs inline instead of waiting on itself
    assert mt.run(lambda: mt.run(threading.get_ident)) == mt.run(threading.get_ident)
    mt.close()
