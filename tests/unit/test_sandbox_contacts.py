"""The sandbox's contact book (sandbox/contacts.py): each list's contacts, kept across restarts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.contacts import ContactBook, ContactChange, ContactState, Via, valid_email

Opener = Callable[[Path], ContactBook]


@pytest.fixture
def opened() -> Iterator[Opener]:
    """Opens a book (as a starting sandbox does); every book is closed at the end."""
    books: list[ContactBook] = []

    def open_book(path: Path) -> ContactBook:
        book = ContactBook(path)
        book.load()
        books.append(book)
        return book

    yield open_book
    for book in books:
        book.close()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "account" / ".sandbox-contacts.jsonl"


def test_a_set_contact_is_found_by_list_and_email_lower_cased(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    event = book.set("news", "Ann@Example.com", "pending", reason="signup", fields={"FirstName": "Ann"})
    record = book.get("news", "ann@example.COM")
    assert record == event.record
    assert record is not None
    assert (record.email, record.list, record.state, record.via) == (
        "ann@example.com",
        "news",
        ContactState.PENDING,
        Via.API,
    )
    assert (record.reason, record.fields) == ("signup", {"FirstName": "Ann"})
    assert event.previous_state is None
    assert book.get("other", "ann@example.com") is None


def test_fields_are_merged_and_kept_when_a_change_names_none(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    book.set("news", "a@example.com", "subscribed", fields={"FirstName": "Ann", "City": "Oslo"})
    book.set("news", "a@example.com", "subscribed", fields={"City": "Bergen"})
    event = book.set("news", "a@example.com", "unsubscribed", via="link")
    assert event.record.fields == {"FirstName": "Ann", "City": "Bergen"}
    assert event.previous_state is ContactState.SUBSCRIBED


def test_the_book_is_the_same_after_a_restart(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    book.set("news", "a@example.com", "subscribed", fields={"FirstName": "Ann"})
    book.set("news", "b@example.com", "pending")
    book.set("news", "a@example.com", "unsubscribed", via="complaint", reason="complaint", job="job-1")
    book.close()

    again = opened(log_path)
    assert again.records() == book.records()
    assert again.events_since(0) == book.events_since(0)
    assert again.book_id == book.book_id
    assert again.events_since(2)[0].job == "job-1"
    assert again.set("news", "c@example.com", "subscribed").seq == 4


def test_events_come_in_order_from_any_sequence_number(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    for n in range(5):
        book.set("news", f"u{n}@example.com", "subscribed")
    assert [e.seq for e in book.events_since(0)] == [1, 2, 3, 4, 5]
    assert [e.record.email for e in book.events_since(3)] == ["u3@example.com", "u4@example.com"]
    assert book.events_since(5) == []
    assert book.last_seq == 5


def test_records_are_selected_by_list_and_by_email(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    book.set("news", "a@example.com", "subscribed")
    book.set("offers", "a@example.com", "removed")
    book.set("news", "b@example.com", "subscribed")
    assert [(r.list, r.email) for r in book.records(email="A@example.com")] == [
        ("news", "a@example.com"),
        ("offers", "a@example.com"),
    ]
    assert [r.email for r in book.records("news")] == ["a@example.com", "b@example.com"]
    assert book.lists() == ["news", "offers"]


def test_concurrent_sets_from_threads_lose_nothing(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)

    def setter(n: int) -> None:
        for i in range(50):
            book.set("news", f"t{n}-{i}@example.com", "subscribed")

    threads = [threading.Thread(target=setter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(book.records("news")) == 200
    assert [e.seq for e in book.events_since(0)] == list(range(1, 201))
    book.close()
    assert len(opened(log_path).records("news")) == 200


def test_an_import_subscribes_new_addresses_and_leaves_opt_outs_alone(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    book.set("news", "out@example.com", "unsubscribed", via="link")
    book.set("news", "gone@example.com", "removed")
    book.set("news", "wait@example.com", "pending")
    added = book.add_subscribed(
        "news",
        ["new@example.com", "OUT@example.com", "gone@example.com", "wait@example.com", "new@example.com"],
    )
    assert added == 2
    states = {r.email: (r.state, r.via) for r in book.records("news")}
    assert states == {
        "new@example.com": (ContactState.SUBSCRIBED, Via.FILE),
        "gone@example.com": (ContactState.SUBSCRIBED, Via.FILE),
        "out@example.com": (ContactState.UNSUBSCRIBED, Via.LINK),
        "wait@example.com": (ContactState.PENDING, Via.API),
    }


def test_a_big_list_of_recipients_is_one_write_and_loads_back(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    assert book.add_subscribed("news", (f"r{i}@example.com" for i in range(20_000))) == 20_000
    book.close()
    again = opened(log_path)
    assert len(again.records("news")) == 20_000
    assert again.get("news", "r19999@example.com") is not None


def test_a_log_mostly_superseded_is_compacted_at_the_start_keeping_the_feed_in_order(
    opened: Opener, log_path: Path
) -> None:
    book = opened(log_path)
    flips = [ContactChange("news", "a@example.com", state) for state in ("subscribed", "unsubscribed") * 700]
    book.set_many(flips)
    book.set("news", "b@example.com", "subscribed")
    book.close()
    lines = len(log_path.read_bytes().splitlines())
    again = opened(log_path)
    assert len(log_path.read_bytes().splitlines()) == 3  # the book's line and one per contact
    assert lines == 1402
    assert [(e.seq, e.record.email) for e in again.events_since(0)] == [
        (1400, "a@example.com"),
        (1401, "b@example.com"),
    ]
    assert again.set("news", "c@example.com", "subscribed").seq == 1402


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_log_goes_on(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    book.set("news", "a@example.com", "subscribed")
    book.close()
    with log_path.open("ab") as out:
        out.write(b'{"seq": 2, "email": "b@exa')
    again = opened(log_path)
    assert [r.email for r in again.records()] == ["a@example.com"]
    again.set("news", "c@example.com", "subscribed")
    again.close()
    assert [r.email for r in opened(log_path).records()] == ["a@example.com", "c@example.com"]


def test_event_ids_differ_between_books(opened: Opener, tmp_path: Path) -> None:
    first, second = opened(tmp_path / "a.jsonl"), opened(tmp_path / "b.jsonl")
    one = first.set("news", "a@example.com", "subscribed")
    two = second.set("news", "a@example.com", "subscribed")
    assert one.seq == two.seq
    assert first.event_id(one) != second.event_id(two)


def test_a_batch_with_an_unknown_state_changes_nothing(opened: Opener, log_path: Path) -> None:
    book = opened(log_path)
    with pytest.raises(ValueError, match="bouncing"):
        book.set_many(
            [
                ContactChange("news", "a@example.com", "subscribed"),
                ContactChange("news", "b@example.com", "bouncing"),
            ]
        )
    assert book.records() == []


@pytest.mark.parametrize(
    ("email", "valid"),
    [
        ("ann@example.com", True),
        ("ann.o'neil+news@mail.example.co.uk", True),
        ("ann@example", False),
        ("ann(at)example.com@example.com", False),
        ("ann@exa_mple.com", False),
        ("ann @example.com", False),
        ("@example.com", False),
    ],
)
def test_malformed_addresses_are_told_apart(email: str, valid: bool) -> None:
    assert valid_email(email) is valid
