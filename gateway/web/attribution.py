"""Attribution of a chat request: its end user and tags (contract §11), read at admission."""

from __future__ import annotations

import re
from typing import Any

from gateway.core.holding import ANY_END_USER
from gateway.errors import InvalidRequest

END_USER_HEADER = "X-Gateway-End-User"
TAGS_HEADER = "X-Gateway-Tags"
MAX_END_USER = 128
MAX_TAGS = 10
# One tag (a regular expression, also in the OpenAPI document).
TAG = r"[A-Za-z0-9_.:/-]{1,64}"
_TAG = re.compile(TAG)


def end_user(header: str | None, body_user: Any) -> str | None:
    """The end user: the header's if sent (it wins), else the body's `user` string, else None."""
    if header is not None:
        return checked_end_user(header, f"The {END_USER_HEADER} header")
    if body_user is None:
        return None
    if not isinstance(body_user, str):
        raise InvalidRequest("`user` must be a string naming the end user (at most 128 characters).")
    return checked_end_user(body_user, "The body's `user`")


def checked_end_user(value: str, what: str) -> str | None:
    """An end user as sent (`what` says where, for the error); None for an empty one."""
    if len(value) > MAX_END_USER:
        raise InvalidRequest(
            f"{what} is {len(value)} characters long; an end user is at most {MAX_END_USER} characters."
        )
    if value == ANY_END_USER:
        # Budgets name every end user of a user so ("USER/*"): one named so could have none of their own.
        raise InvalidRequest(
            f"{what} is '*', which names every end user in budgets; name the end user otherwise."
        )
    return value or None


def tags(header: str | None) -> tuple[str, ...]:
    """The tags of the `X-Gateway-Tags` header, in the order sent, each once; () without one."""
    if header is None:
        return ()
    # Spaces and tabs around a tag are allowed (HTTP list style); nothing else is trimmed.
    found = [tag.strip(" \t") for tag in header.split(",")]
    if len(found) > MAX_TAGS:
        raise InvalidRequest(
            f"The {TAGS_HEADER} header has {len(found)} tags; send at most {MAX_TAGS}, separated by commas."
        )
    for tag in found:
        if not tag:
            raise InvalidRequest(
                f"The {TAGS_HEADER} header has an empty tag; send 1 to {MAX_TAGS} tags separated by "
                "commas, each 1-64 characters."
            )
        if _TAG.fullmatch(tag) is None:
            shown = tag[:70]
            why = (
                "is longer than 64 characters"
                if len(tag) > 64
                else "has characters other than A-Z a-z 0-9 _ . : / -"
            )
            raise InvalidRequest(
                f"The {TAGS_HEADER} header's tag {shown!r} {why}; each tag is 1-64 of those."
            )
    return tuple(dict.fromkeys(found))
