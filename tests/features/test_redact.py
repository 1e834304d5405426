"""Credentials never leave a connection string that is shown or logged."""

from __future__ import annotations

import pytest

from features.redact import redact_connection


@pytest.mark.parametrize(("given", "shown"), [
    ("10.0.0.5:6379,password=s3cret,ssl=true", "10.0.0.5:6379,password=***,ssl=true"),
    ("redis:6379,password=hunter2", "redis:6379,password=***"),
    ("redis:6379,ssl=true,PASSWORD=x,db=0", "redis:6379,ssl=true,PASSWORD=***,db=0"),
    ("redis://alice:s3cret@cache:6379/0", "redis://alice:***@cache:6379/0"),
    ("rediss://:s3cret@cache:6380", "rediss://:***@cache:6380"),
    ("127.0.0.1:6379", "127.0.0.1:6379"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
])
def test_passwords_are_masked_and_the_rest_kept(given: str, shown: str) -> None:
    assert redact_connection(given) == shown


def test_an_empty_password_stays_visibly_empty_and_text_without_one_is_unchanged() -> None:
    assert redact_connection("h:1,password=,db=0") == "h:1,password=***,db=0"
    assert redact_connection("") == ""
