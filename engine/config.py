"""Darknet .cfg and .data files -> sections with typed, line-numbered options.

Syntax as Darknet reads it (src/parser.c, read_cfg): `[section]` headers, `key=value` lines,
`#` and `;` start comment lines, and all whitespace inside a line is removed. Options are read
through typed getters that name the file, line and key when a value has the wrong type, and that
remember which keys were used so unused ones can be reported as Darknet does ("Unused field").
"""

import os
import re
import sys

from .errors import ConfigError


class Option:
    __slots__ = ("value", "line", "used")

    def __init__(self, value, line):
        self.value = value
        self.line = line
        self.used = False


class Section:
    """One `[name]` block of a cfg file: its options and where they came from."""

    def __init__(self, name, path, line):
        self.name = name
        self.path = path
        self.line = line
        self.options = {}
        self.repeated = []  # (key, line) of keys given again: Darknet reads only the first

    def where(self, key=None):
        line = self.options[key].line if key in self.options else self.line
        return f"{self.path}:{line}: [{self.name}]"

    def error(self, message, key=None):
        """A ConfigError that names the file, line and section (and the key's line if given)."""
        return ConfigError(f"{self.where(key)} {message}")

    def has(self, key):
        return key in self.options

    def _raw(self, key):
        option = self.options.get(key)
        if option is None:
            return None
        option.used = True
        return option.value

    def _typed(self, key, default, convert, expected):
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError:
            raise self.error(f"{key}={raw}: expected {expected}", key) from None

    def str(self, key, default=None):
        raw = self._raw(key)
        return default if raw is None else raw

    def int(self, key, default=None):
        return self._typed(key, default, _parse_int, "an integer")

    def float(self, key, default=None):
        return self._typed(key, default, float, "a number")

    def bool(self, key, default=False):
        return bool(self._typed(key, int(default), _parse_int, "0 or 1"))

    def int_list(self, key, default=None):
        return self._typed(key, default, lambda v: [_parse_int(x) for x in _items(v)],
                           "a comma-separated list of integers")

    def float_list(self, key, default=None):
        return self._typed(key, default, lambda v: [float(x) for x in _items(v)],
                           "a comma-separated list of numbers")

    def require_positive(self, key, value):
        if value <= 0:
            raise self.error(f"{key}={value}: expected a positive value", key)
        return value

    def unused(self):
        return [k for k, o in self.options.items() if not o.used]


def _parse_int(text):
    """Darknet reads integers with C's atoi: the longest leading [+-]digits prefix, the rest
    ignored, no digits giving 0. We follow it where cfgs rely on it (AlexeyAB's `filters=40#32`,
    an inline comment, is 40; "3.0" is 3) but refuse what is surely a mistake: no leading digits
    ("abc", which atoi reads as 0) and a fractional number ("2.5", which atoi truncates to 2)."""
    try:
        return int(text)
    except ValueError:
        pass
    match = _INT_PREFIX.match(text)
    if match is None:
        raise ValueError(text)
    rest = text[match.end():]
    if rest[:1] in (".", "e", "E"):
        value = float(text)  # "3.0", "1e3": whole numbers only
        if value != int(value):
            raise ValueError(text)
        return int(value)
    return int(match.group())


_INT_PREFIX = re.compile(r"[+-]?[0-9]+")


def _items(text):
    return [x for x in text.split(",") if x != ""]


def read_cfg(path):
    """Parse a Darknet cfg file into a list of Sections (the first one must be [net])."""
    lines = _read_lines(path, "cfg")
    sections = []
    for number, raw in enumerate(lines, start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"{path}:{number}: malformed section header '{raw.strip()}'")
            sections.append(Section(line[1:-1].lower(), path, number))
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected 'key=value', got '{raw.strip()}'")
        if not sections:
            raise ConfigError(f"{path}:{number}: option '{line}' before any [section]")
        key, value = line.split("=", 1)
        if key in sections[-1].options:
            # Darknet's option_find returns the first occurrence; a repeat is an unused field.
            sections[-1].repeated.append((key, number))
        else:
            sections[-1].options[key] = Option(value, number)
    if not sections:
        raise ConfigError(f"{path}: no sections found; a cfg starts with [net]")
    if sections[0].name not in ("net", "network"):
        first = sections[0]
        raise ConfigError(f"{path}:{first.line}: the first section must be [net], got [{first.name}]")
    return sections


def warn_unused(section, stream=None):
    stream = stream if stream is not None else sys.stderr  # looked up now, so redirection works
    for key in section.unused():
        print(f"Unused field: '{key}' in [{section.name}] at {section.path}:{section.options[key].line}",
              file=stream)
    for key, line in section.repeated:
        print(f"Unused field: '{key}' in [{section.name}] at {section.path}:{line} (repeated; "
              f"line {section.options[key].line} is used)", file=stream)


def read_data_file(path):
    """Parse a Darknet .data file (classes, train, valid, labels, names, backup, top) into a dict.

    Relative paths inside it are resolved against the current directory first (as Darknet does)
    and then against the .data file's own folder, so a checkout works from any directory.
    """
    values = {}
    for number, raw in enumerate(_read_lines(path, "data"), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected 'key=value', got '{line}'")
        key, value = (part.strip() for part in line.split("=", 1))
        values.setdefault(key, value)  # Darknet uses the first occurrence of a key
    return values


def resolve_path(path, relative_to):
    """`path` as given if it exists, else relative to the folder of `relative_to`."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if os.path.exists(candidate):
        return candidate
    # Files in a checkout are written relative to its root (cfg/.., data/..): try one level up.
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(relative_to))), path)
    return candidate if os.path.exists(candidate) else path


def _read_lines(path, kind):
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:  # -sig: skip a BOM
            return handle.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {kind} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a {kind} file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {kind} file ({error.strerror})") from None
