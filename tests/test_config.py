"""Settings travel to other processes through POLOS_* variables, losslessly."""

from __future__ import annotations

import pytest

from polos import Settings


def test_to_env_round_trips_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    custom = Settings(
        nats_url="nats://a:1,nats://b:2",
        prefix="tenant-7",
        task_ack_wait=1.5,
        heartbeat_interval=0.2,
        worker_ttl=4.0,
        local_retry_limit=9.0,
        request_timeout=3.0,
        service_ack_wait=2.5,
        slot_lease=6.0,
        index_window=0.2,
        write_coalesce=0.002,
        gc_threshold=1234,
        write_batch=7,
        replicas=3,
    )
    for name, value in custom.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == custom


def test_a_prefix_that_is_not_one_subject_token_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Settings(prefix="a.b")


def test_a_negative_write_batch_is_refused_and_zero_turns_it_off() -> None:
    with pytest.raises(ValueError, match=r"write_batch \(POLOS_WRITE_BATCH\) must be 0"):
        Settings(write_batch=-1)
    assert Settings(write_batch=0).write_batch == 0
