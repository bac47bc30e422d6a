"""One schema for every setting: a config dataclass field carries its help, its command-line flag and the app
control that sets it in its metadata (as trl's configs carry their help), so the CLI's flags, the app's error
placement, config JSON and docs/SETTINGS.md are all generated from the dataclasses instead of hand-written maps.

    num_steps: int = setting(20, "denoising steps", flag="--steps", widget="steps")

`SettingError` is the ValueError a `validate()` raises; it names the field, so a face shows the message on the
control (app) or flag (CLI) that set it."""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields, is_dataclass


class SettingError(ValueError):
    """A refused setting value; `field` names the dataclass field (None when several are at fault)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def setting(default=MISSING, help: str = "", *, flag: str | bool | None = None, widget: str | None = None,
            label: str | None = None, choices=None, default_factory=MISSING) -> Field:
    """A dataclass field with its help text, its CLI flag (None: --field-name; False: not on the command line),
    the name of the app control that sets it (None: no control) and that control's short label."""
    meta = {"help": help, "flag": flag, "widget": widget, "label": label,
            "choices": tuple(choices) if choices else None}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check(cond: bool, message: str, name: str | None = None) -> None:
    """Raise SettingError(message, name) unless `cond`."""
    if not cond:
        raise SettingError(message, name)


def shown(value) -> str:
    """A value as a message shows it to a person: text in quotes as typed (no escapes), numbers plain (numpy's
    too, not np.float64(0.5)), anything else as str; repr's escapes and type names are for programmers."""
    if isinstance(value, str):
        return "'" + " ".join(value.split()) + "'" if "\n" in value else f"'{value}'"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    return str(value)


def default_of(f: Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def help_of(cls) -> dict[str, str]:
    """{field: help} of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def flag_of(f: Field) -> str | None:
    """The field's command-line flag, or None when it has none."""
    flag = f.metadata.get("flag")
    if flag is False:
        return None
    return flag or "--" + f.name.replace("_", "-")


def widget_of(cls, name: str) -> str | None:
    """The app control that sets field `name` of `cls` (nested config dataclasses searched too)."""
    for f in fields(cls):
        if f.name == name and f.metadata.get("widget"):
            return f.metadata["widget"]
        inner = default_of(f)
        if is_dataclass(inner):
            found = widget_of(type(inner), name)
            if found:
                return found
    return None


def control_spec(cls, name: str) -> dict:
    """What the app's control of field `name` is made of: its label, choices (None: free), the default, the
    element id (the widget name, dashed) and the help as its tooltip-length info."""
    f = cls.__dataclass_fields__[name]
    m = f.metadata
    return {"label": m.get("label") or name.replace("_", " "), "choices": m.get("choices"), "default": default_of(f),
            "elem_id": (m.get("widget") or name).replace("_", "-"), "info": m.get("help", "")}


def from_dict(cls, data: dict, source: str = "config"):
    """`cls` from a JSON object of field: value, lists turned into tuples; unknown fields named."""
    if not isinstance(data, dict):
        raise SettingError(f"{source} must hold a JSON object of field: value")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingError(f"unknown {source} fields: {', '.join(unknown)}", unknown[0])
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _show(v) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(map(str, v)) or "()"
    return repr(v) if v == "" else str(v)


def markdown_table(cls, own_only: bool = False) -> str:
    """The settings of `cls` as a Markdown table: field, default, CLI flag, app control, help (`own_only`: the
    fields a subclass adds or changes)."""
    rows = ["| field | default | flag | app control | what it does |", "| --- | --- | --- | --- | --- |"]
    parent = {f.name: (default_of(f), f.metadata.get("help")) for b in cls.__mro__[1:] if is_dataclass(b)
              for f in fields(b)} if own_only else {}
    for f in fields(cls):
        if parent.get(f.name) == (default_of(f), f.metadata.get("help")):
            continue
        default = default_of(f)
        if is_dataclass(default):
            continue
        flag = flag_of(f)
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" ({' / '.join(choices)})" if choices else "")
        rows.append(f"| `{f.name}` | `{_show(default)}` | {f'`{flag}`' if flag else '-'} | "
                    f"{f.metadata.get('label') or f.metadata.get('widget') or '-'} | {text.replace('|', '/')} |")
    return "\n".join(rows)
