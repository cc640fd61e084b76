"""Text tags (``$account-name$`` …) in subject and description.

A template is parsed once into literal text and tag names, so an unknown tag fails before any
planning and each activity is rendered by joining parts. Substitution is a single pass over the
template: a value that itself reads ``$user-name$`` stays as written (values are data).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from syncsvc.planner.errors import PlanError
from syncsvc.planner.model import PlanUser, Target

USER_TAGS = frozenset({"user-name", "user-firstname", "user-lastname", "user-email", "user-mobile"})
TARGET_TAGS = frozenset(
    {
        "contact-firstname",
        "contact-lastname",
        "contact-email",
        "contact-phone",
        "contact-mobile",
        "account-name",
        "account-email",
        "account-phone",
    }
)
KNOWN_TAGS = frozenset({"targetgroup-name"}) | USER_TAGS | TARGET_TAGS

#: Anything shaped like a tag (words joined by hyphens between dollars); "$5" stays text.
_TAG_RE = re.compile(r"\$([A-Za-z]+(?:-[A-Za-z]+)+)\$")


@dataclass(frozen=True, slots=True)
class Text:
    """A parsed template field: even indexes are literal text, odd ones are tag names."""

    parts: tuple[str, ...]

    @property
    def uses_target(self) -> bool:
        return any(tag in TARGET_TAGS for tag in self.parts[1::2])

    def render(self, fixed: Mapping[str, str], target: Target | None) -> str:
        """Fill the tags: ``fixed`` holds group and user values, the target gives the rest."""
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = list(parts)
        for i in range(1, len(parts), 2):
            tag = parts[i]
            out[i] = fixed[tag] if tag in fixed else target_value(tag, target)
        return "".join(out)


def parse(text: str, loc: tuple[str | int, ...]) -> Text:
    """Split a field into literals and tags; an unknown tag fails, naming tag and field."""
    pieces = _TAG_RE.split(text)
    unknown = sorted({tag for tag in pieces[1::2] if tag not in KNOWN_TAGS})
    if unknown:
        names = ", ".join(f"${tag}$" for tag in unknown)
        raise PlanError.at(loc, f"unknown text tag {names} in {loc[-1]}")
    return Text(tuple(pieces))


def split_name(name: str) -> tuple[str, str]:
    """First word is the first name, the rest the last name ("Anne Marie Jensen" → Anne)."""
    words = name.split(maxsplit=1)
    if not words:
        return "", ""
    return words[0], words[1] if len(words) > 1 else ""


def fixed_values(targetgroup_name: str, user: PlanUser) -> dict[str, str]:
    """Values that are the same for every activity of one user."""
    first, last = split_name(user.name)
    return {
        "targetgroup-name": targetgroup_name,
        "user-name": user.name,
        "user-firstname": first,
        "user-lastname": last,
        "user-email": user.email,
        "user-mobile": user.mobile,
    }


def target_value(tag: str, target: Target | None) -> str:
    """A target tag's value: the account is the target, the contact its first contact."""
    if target is None:
        return ""
    if tag == "account-name":
        return target.name
    if tag == "account-email":
        return target.email
    if tag == "account-phone":
        return target.phone
    if not target.contacts:
        return ""
    contact = target.contacts[0]
    by_tag = {
        "contact-firstname": contact.first_name,
        "contact-lastname": contact.last_name,
        "contact-email": contact.email,
        "contact-phone": contact.phone,
        "contact-mobile": contact.mobile,
    }
    return by_tag[tag]
