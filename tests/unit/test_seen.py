"""rules.customer.Seen, the compact dedup memory, against a plain dict doing the same steps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.customer import Seen, dedup_entries, event_key

KEYS = [event_key(f"e{i}") for i in range(12)]

# A step: ("add", key index, kind, day, amount), ("refund", key index, refunded),
# ("prune", first day, slack days), ("reload",) (to text and back), ("copy",) (work on a copy;
# the original must not change).
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, len(KEYS) - 1),
            st.integers(0, 1),
            st.integers(20_000, 20_060),
            st.integers(0, 10**12),
        ),
        st.tuples(st.just("refund"), st.integers(0, len(KEYS) - 1), st.integers(0, 10**6)),
        st.tuples(st.just("prune"), st.integers(20_000, 20_070), st.integers(0, 10)),
        st.tuples(st.just("reload")),
        st.tuples(st.just("copy")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_seen_does_what_a_dict_does(script: list[tuple[object, ...]]) -> None:
    seen = Seen()
    model: dict[str, list[int]] = {}
    for step in script:
        kind = step[0]
        if kind == "add":
            _, index, entry_kind, day, amount = step
            key = KEYS[int(index)]  # type: ignore[call-overload]
            assert (seen.get(key) is None) == (key not in model)
            if key not in model:  # add() is only for new keys, as apply() uses it
                entry = [int(entry_kind), int(day), int(amount), 0]  # type: ignore[call-overload]
                seen.add(key, entry)
                model[key] = entry
        elif kind == "refund":
            _, index, refunded = step
            key = KEYS[int(index)]  # type: ignore[call-overload]
            if key in model and model[key][0] == 0:
                entry = [0, model[key][1], model[key][2], int(refunded)]  # type: ignore[call-overload]
                seen.replace(key, entry)
                model[key] = entry
        elif kind == "prune":
            _, first_day, slack = step
            first, lag = int(first_day), int(slack)  # type: ignore[call-overload]
            seen.prune(first, lag)
            if model and min(v[1] for v in model.values()) < first - lag:
                model = {k: v for k, v in model.items() if v[1] >= first}
        elif kind == "reload":
            text = seen.text()
            assert dedup_entries(text) == len(model)
            seen = Seen(text)
        else:
            before = seen.as_dict()
            changed = seen.copy()
            if changed.get(KEYS[0]) is None:
                changed.add(KEYS[0], [0, 1, 1, 0])
            else:
                changed.prune(10**6, 0)  # forgets everything
            assert seen.as_dict() == before  # changing the copy left the original alone
            seen = seen.copy()
        assert seen.as_dict() == model
        assert len(seen) == len(model)
        assert seen.oldest_day == (min(v[1] for v in model.values()) if model else None)
        assert Seen(seen.text()) == seen
        for key in KEYS:
            assert seen.get(key) == model.get(key)


def test_a_key_is_found_only_as_a_whole_entry() -> None:
    """Amounts and days are digits, keys base64url: a key made of digits must not be found
    inside an amount (every entry starts with ";" and its key ends at ":"), or every new event
    of such a customer would parse the whole memory."""
    seen = Seen()
    seen.add("AAAA", [0, 20_000, 123412345678, 0])
    assert seen.get("1234") is None
    assert seen.get("12345678") is None
    assert seen.get("AAA") is None
    assert seen._map is None  # answered from the text: no parse for a key that is not there
    assert seen.get("AAAA") == [0, 20_000, 123412345678, 0]
