"""How budgets name their subjects: stored ids, the names people read, and end users.

A budget's `subject` is stored as an id: a team's or user's id as text, a key's id, or for an
end-user budget "USER_ID/END_USER" ("USER_ID/*" for a default). People name them by name instead:
"TEAM", "USER", "KEY_ID", "USER/END_USER", "USER/*".
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from gateway.errors import InvalidRequest, NotFound
from gateway.web.attribution import MAX_END_USER

# The joins that name a budget `b`'s subject, and the name (`SUBJECT_NAME`): a team's or user's
# name, a key's id, or "USER/END_USER" for an end-user budget.
# The subject is cast to the id (only for its own scope: a key id is no number), so that each
# budget finds its team or user by primary key; comparing ids cast to text scanned the whole table
# for every budget (100 ms for 1,000 user budgets on SQLite).
SUBJECT_JOINS = (
    "LEFT JOIN teams t ON b.scope = 'team' "
    "AND t.id = CASE WHEN b.scope = 'team' THEN CAST(b.subject AS INTEGER) END "
    "LEFT JOIN users u ON b.scope = 'user' "
    "AND u.id = CASE WHEN b.scope = 'user' THEN CAST(b.subject AS INTEGER) END "
    "LEFT JOIN users eu ON b.scope = 'end_user' AND eu.id = b.user_id"
)
SUBJECT_NAME = (
    "COALESCE(t.name, u.name, eu.name || substr(b.subject, length(CAST(b.user_id AS VARCHAR(32))) + 1), "
    "b.subject)"
)


def end_user_of(conn: Connection, subject: str) -> tuple[int, str, str]:
    """An end-user budget's subject, "USER/END_USER" or "USER/*": (user id, user name, end user).

    User names and end users may both hold a slash: the user is the part before a slash that names
    one; two such readings are refused as ambiguous.
    """
    readings = []
    for at, char in enumerate(subject):
        if char != "/":
            continue
        user, end_user = subject[:at], subject[at + 1 :]
        row = conn.execute(text("SELECT id FROM users WHERE name = :name"), {"name": user}).first()
        if row is not None and end_user:
            readings.append((int(row[0]), user, end_user))
    if not readings:
        raise NotFound(
            f"{subject!r} does not name an end user: write USER/END_USER (or USER/* for every end user "
            "of USER without a budget of their own), where USER is a gateway user's name.",
            field="subject",
        )
    if len(readings) > 1:
        users = " or ".join(repr(user) for _, user, _ in readings)
        raise InvalidRequest(f"{subject!r} is ambiguous: its user could be {users}.", field="subject")
    user_id, user, end_user = readings[0]
    if len(end_user) > MAX_END_USER:
        raise InvalidRequest(
            f"The end user of {subject!r} is {len(end_user)} characters long; an end user is at most "
            f"{MAX_END_USER} characters.",
            field="subject",
        )
    return user_id, user, end_user
