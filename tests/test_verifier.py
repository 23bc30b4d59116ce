"""Verification in worker processes: a file past the deadline or a decoder that dies costs that
file only, and the next file gets a fresh worker."""

import os
import signal

import pytest
from PIL import Image

from clipgram import images, verifier


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    return path


def test_a_decode_past_the_deadline_fails_that_file_and_the_next_gets_a_new_worker(tmp_path, small):
    big = tmp_path / "big.png"
    Image.effect_noise((4000, 4000), 64).convert("RGB").save(big, compress_level=1)
    with verifier.Verifier(verifier.VerifySettings(deadline_s=0.05, workers=1)) as check:
        with pytest.raises(images.BadImage, match="longer than 0.05 s"):
            check.verify(big)
        check.settings = verifier.VerifySettings(deadline_s=30, workers=1)
        assert check.verify(small) == images.ImageInfo("PNG", 32, 32)


def test_a_decoder_that_dies_fails_that_file_only(small):
    with verifier.Verifier(verifier.VerifySettings(workers=1)) as check:
        assert check.verify(small).width == 32
        (worker,) = check._all
        os.kill(worker.proc.pid, signal.SIGSEGV)  # what a crashing C decoder does to its process
        worker.proc.wait()
        with pytest.raises(images.BadImage, match="crashed"):
            check.verify(small)
        assert check.verify(small).width == 32


def test_worker_answers_are_what_verify_says_in_process(tmp_path, small):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html><body>login</body></html>")
    with verifier.Verifier(verifier.VerifySettings(workers=2)) as check:
        assert check.verify(small) == images.verify(small)
        with pytest.raises(images.BadImage) as remote:
            check.verify(bad)
    with pytest.raises(images.BadImage) as local:
        images.verify(bad)
    assert str(remote.value) == str(local.value)


def test_threads_waiting_for_a_worker_get_a_fresh_one_when_it_misses_the_deadline(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    big = tmp_path / "big.png"
    Image.effect_noise((3000, 3000), 64).convert("RGB").save(big, compress_level=1)
    with verifier.Verifier(verifier.VerifySettings(deadline_s=0.05, workers=1)) as check, \
            ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(check.verify, big) for _ in range(3)]
        for future in futures:  # none waits forever for the one worker, which is replaced each time
            with pytest.raises(images.BadImage, match="longer than"):
                future.result(timeout=120)
