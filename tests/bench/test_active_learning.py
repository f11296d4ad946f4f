import numpy as np
import pytest

from bench.active_learning import stratified_start


@pytest.mark.parametrize(
    ("counts", "fraction", "expected"),
    [
        ({"a": 249, "b": 249}, 0.1, {"a": 25, "b": 25}),
        ({"a": 100, "b": 30, "c": 5}, 0.1, {"a": 10, "b": 3, "c": 2}),
        ({"a": 40, "b": 1}, 0.5, {"a": 20, "b": 1}),
    ],
)
def test_stratified_start_takes_a_share_of_each_class(counts, fraction, expected):
    labels = [name for name, count in counts.items() for _ in range(count)]
    np.random.default_rng(0).shuffle(labels)

    chosen = stratified_start(labels, fraction, seed=3)

    assert list(chosen) == sorted(set(chosen.tolist()))
    taken = {name: sum(labels[i] == name for i in chosen) for name in counts}
    assert taken == expected


def test_stratified_start_is_seeded():
    labels = ["a"] * 50 + ["b"] * 50
    first = stratified_start(labels, 0.2, seed=1)
    assert np.array_equal(first, stratified_start(labels, 0.2, seed=1))
    assert not np.array_equal(first, stratified_start(labels, 0.2, seed=2))
    assert len(stratified_start([], 0.1, seed=0)) == 0
