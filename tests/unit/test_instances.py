from host_node.instances import InstancePool


def test_reserve_respects_both_caps() -> None:
    pool: InstancePool[str] = InstancePool(max_total=3)
    assert [pool.reserve("f", 2) for _ in range(3)] == [True, True, False]
    assert pool.reserve("g", 5) and not pool.reserve("g", 5)  # node total of 3 reached
    assert pool.total == 3


def test_idle_reuse_is_last_in_first_out() -> None:
    pool: InstancePool[str] = InstancePool(max_total=4)
    pool.reserve("f", 4)
    pool.reserve("f", 4)
    pool.put_idle("f", "old", now=1.0, keep_alive_s=60)
    pool.put_idle("f", "new", now=2.0, keep_alive_s=60)
    assert pool.idle_counts() == {"f": 2}
    assert pool.take_idle("f") == "new"
    assert pool.take_idle("g") is None


def test_keep_alive_expiry_frees_capacity() -> None:
    pool: InstancePool[str] = InstancePool(max_total=2)
    pool.reserve("f", 2)
    pool.reserve("f", 2)
    pool.put_idle("f", "a", now=0.0, keep_alive_s=60.0)
    pool.put_idle("f", "b", now=50.0, keep_alive_s=60.0)
    assert pool.expired(now=70.0) == [("f", "a")]
    assert pool.live("f") == 1 and pool.idle_counts() == {"f": 1}
    assert pool.reserve("f", 2)


def test_evict_takes_the_longest_idle_of_another_function() -> None:
    pool: InstancePool[str] = InstancePool(max_total=3)
    for key, name, t in [("f", "f1", 5.0), ("g", "g1", 1.0), ("g", "g2", 9.0)]:
        pool.reserve(key, 3)
        pool.put_idle(key, name, now=t, keep_alive_s=60)
    assert pool.evict_lru(except_key="g") == ("f", "f1")
    assert pool.evict_lru(except_key="f") == ("g", "g1")
    assert pool.evict_lru(except_key="g") is None
    assert pool.total == 1


def test_discard_and_drain() -> None:
    pool: InstancePool[str] = InstancePool(max_total=5)
    for _ in range(3):
        pool.reserve("f", 5)
    pool.discard("f")
    pool.put_idle("f", "x", now=0.0, keep_alive_s=60)
    assert pool.drain() == [("f", "x")]
    assert pool.total == 1 and pool.idle_counts() == {}


def test_draining_a_function_takes_its_idle_instances_of_every_code_version() -> None:
    pool: InstancePool[str] = InstancePool(max_total=5)
    for key, name in [("t/f@v1", "old"), ("t/f@v2", "new"), ("t/fg@v1", "other"), ("u/f@v1", "tenant")]:
        pool.reserve(key, 5)
        pool.put_idle(key, name, now=0.0, keep_alive_s=60)
    pool.reserve("t/f@v2", 5)  # running: not idle, not drained

    assert sorted(pool.drain("t/f")) == [("t/f@v1", "old"), ("t/f@v2", "new")]
    assert pool.idle_counts() == {"t/fg@v1": 1, "u/f@v1": 1}
    assert pool.live("t/f@v2") == 1 and pool.live("t/f@v1") == 0


def test_each_instance_keeps_its_own_keep_alive() -> None:
    """The scheduler sets keep-alive per function: a short one expires before a long one."""
    pool: InstancePool[str] = InstancePool(max_total=2)
    pool.reserve("f", 1)
    pool.reserve("g", 1)
    pool.put_idle("f", "short", now=0.0, keep_alive_s=5.0)
    pool.put_idle("g", "long", now=0.0, keep_alive_s=600.0)
    assert pool.expired(now=6.0) == [("f", "short")]
    assert pool.expired(now=599.0) == []
    assert pool.expired(now=601.0) == [("g", "long")]
