"""The lost-head watch: it waits out short outages and reports a lasting one, once."""

from __future__ import annotations

import threading

from rasterkube.runtime.headwatch import HeadWatch, head_lost_message, split_address


def test_a_lasting_outage_is_reported_once_with_what_to_do() -> None:
    lost: list[str] = []
    done = threading.Event()
    answers = iter([True, True, False, True] + [False] * 1000)  # one blip, then down for good

    def report(message: str) -> None:
        lost.append(message)
        done.set()

    watch = HeadWatch("10.0.0.1:6379", grace_s=0.05, interval_s=0.01, on_lost=report,
                      probe=lambda host, port: next(answers)).start()  # fmt: skip
    assert done.wait(5)
    watch.stop()
    assert lost == [head_lost_message("10.0.0.1:6379", 0.05)]
    assert "10.0.0.1:6379" in lost[0] and "run it again" in lost[0] and "nothing that looks complete" in lost[0]


def test_a_head_that_answers_is_never_reported() -> None:
    lost: list[str] = []
    seen = threading.Event()

    def probe(host: str, port: int) -> bool:
        assert (host, port) == ("127.0.0.1", 6380)
        seen.set()
        return True

    watch = HeadWatch("127.0.0.1:6380", grace_s=0.0, interval_s=0.01, on_lost=lost.append, probe=probe).start()
    assert seen.wait(5)
    watch.stop()
    assert lost == []


def test_addresses_with_scheme_and_ipv6() -> None:
    assert split_address("ray://head.svc:10001") == ("head.svc", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)
