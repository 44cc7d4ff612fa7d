"""Proxmox property strings: ``key=value,key=value`` with an optional default key.

vzdump packs structured options into one value this way (``performance
max-workers=16``, ``fleecing enabled=1,storage=local``); parsing it in one
place keeps the error messages the same for every option.
"""

from __future__ import annotations


class PropertyStringError(ValueError):
    """A property string is malformed; the message is one line for the user."""


def parse_property_string(
    value: str, allowed: frozenset[str] | set[str], default_key: str | None = None
) -> dict[str, str]:
    """Split ``value`` into its ``key=value`` parts; a bare part is ``default_key``'s value.

    Unknown and repeated keys are errors, and so are separators without any part (``,,,``); an
    empty value sets nothing. Values are returned as text; the caller types them.
    """
    result: dict[str, str] = {}
    if value.strip() and not value.replace(",", "").strip():
        raise PropertyStringError(f"{value!r} sets no property")
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, raw = part.partition("=")
        if not eq:
            if default_key is None:
                raise PropertyStringError(f"{part!r} is not of the form key=value")
            key, raw = default_key, part
        key = key.strip()
        if key not in allowed:
            raise PropertyStringError(f"unknown property {key!r} (known: {', '.join(sorted(allowed))})")
        if key in result:
            raise PropertyStringError(f"property {key!r} given twice")
        result[key] = raw.strip()
    return result
