"""The diff's record spool: every record read back exactly as it was put, whatever the order of
reads and puts, across the edges of the window it reads ahead, and from several threads."""

from __future__ import annotations

import random
import threading

from dirpull.spool import WINDOW, RecordSpool, SpooledJson


def blobs(rng: random.Random, n: int) -> list[bytes]:
    # Sizes around, below and above the window, so records straddle its edges and outgrow it.
    sizes = [rng.choice((1, 37, 900, WINDOW - 1, WINDOW, WINDOW + 5)) for _ in range(n)]
    return [rng.randbytes(size) for size in sizes]


def test_records_read_back_exactly_in_any_order() -> None:
    rng = random.Random(5)
    spool = RecordSpool()
    try:
        data = blobs(rng, 60)
        held = [spool.put(b) for b in data]
        assert all(h.read() == b for h, b in zip(held, data, strict=True))  # in order
        order = list(range(len(data)))
        rng.shuffle(order)
        assert all(held[i].read() == data[i] for i in order)  # and scattered
        assert spool.size == sum(map(len, data))
    finally:
        spool.close()


def test_a_record_put_after_a_read_is_read_back() -> None:
    spool = RecordSpool()
    try:
        first = spool.put(b'{"a":1}')
        assert first.read() == b'{"a":1}'  # reads ahead from here: only 7 bytes exist yet
        later = [spool.put(f'{{"n":{i}}}'.encode()) for i in range(1000)]
        assert [x.read() for x in later] == [f'{{"n":{i}}}'.encode() for i in range(1000)]
        assert first.read() == b'{"a":1}'
    finally:
        spool.close()


def test_threads_reading_and_putting_at_once_each_read_their_own_records() -> None:
    spool = RecordSpool()
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[SpooledJson, bytes]] = []
        for _ in range(400):
            blob = rng.randbytes(rng.randint(1, 3000))
            mine.append((spool.put(blob), blob))
            held, want = rng.choice(mine)
            if held.read() != want:
                errors.append(f"thread {seed} read another record's bytes")
                return

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in threads)
        assert errors == []
    finally:
        spool.close()
