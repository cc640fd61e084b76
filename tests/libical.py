"""libical (the parser of Evolution and many CalDAV servers) as a judge of what we write.

Its Python binding (``gi`` + ``ICalGLib``, Debian ``gir1.2-ical-3.0`` and ``python3-gi``) lives
in the system interpreter, not in the venv, so it runs in a ``/usr/bin/python3`` subprocess:
the iCalendar text goes in on stdin; out come every ``X-LIC-ERROR`` libical attached while
parsing and checking RFC 5545's property restrictions, and the items as libical read them.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT_S = 60

_SCRIPT = r"""
import json, sys
import gi
gi.require_version("ICalGLib", "3.0")
from gi.repository import ICalGLib

root = ICalGLib.Component.new_from_string(sys.stdin.read())
errors = []
items = []

def walk(component):
    kind = ICalGLib.Component.kind_to_string(component.isa())
    prop = component.get_first_property(ICalGLib.PropertyKind.XLICERROR_PROPERTY)
    while prop is not None:
        errors.append(f"{kind}: {prop.get_xlicerror()}")
        prop = component.get_next_property(ICalGLib.PropertyKind.XLICERROR_PROPERTY)
    if kind in ("VEVENT", "VTODO"):
        status = component.get_status()
        start = component.get_dtstart()
        items.append({
            "kind": kind,
            "uid": component.get_uid(),
            "cancelled": status == ICalGLib.PropertyStatus.CANCELLED,
            "alarms": component.count_components(ICalGLib.ComponentKind.VALARM_COMPONENT),
            "all_day": bool(start is not None and not start.is_null_time() and start.is_date()),
        })
    child = component.get_first_component(ICalGLib.ComponentKind.ANY_COMPONENT)
    while child is not None:
        walk(child)
        child = component.get_next_component(ICalGLib.ComponentKind.ANY_COMPONENT)

if root is None:
    errors.append("libical could not parse the text at all")
else:
    ICalGLib.restriction_check(root)  # adds an X-LIC-ERROR for each property out of place
    walk(root)
print(json.dumps({"errors": errors, "items": items}))
"""


@dataclass(frozen=True, slots=True)
class LibicalItem:
    kind: str
    uid: str
    cancelled: bool
    alarms: int
    all_day: bool


@dataclass(frozen=True, slots=True)
class LibicalRead:
    #: Every complaint (empty: libical took all of it).
    errors: list[str]
    #: The VEVENTs and VTODOs in the order libical met them.
    items: list[LibicalItem]


def libical_read(ical: bytes | str) -> LibicalRead:
    """``ical`` as libical reads and judges it."""
    text = ical.decode() if isinstance(ical, bytes) else ical
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", _SCRIPT],
        input=text,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    answer = json.loads(done.stdout)
    return LibicalRead(answer["errors"], [LibicalItem(**item) for item in answer["items"]])
