"""Darknet .cfg and .data files -> sections with typed, line-numbered options.

Syntax as Darknet reads it (src/parser.c, read_cfg): `[section]` headers, `key=value` lines,
`#` and `;` start comment lines, and all whitespace inside a line is removed. Options are read
through typed getters that name the file, line and key when a value has the wrong type, and that
remember which keys were used so unused ones can be reported as Darknet does ("Unused field").
"""

import math
import os
import re
import stat
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
        return f"{self.path}:{line}: [{shorten(self.name)}]"

    def error(self, message, key=None):
        """A ConfigError that names the file, line and section (and the key's line if given)."""
        return ConfigError(f"{self.where(key)} {message}")

    def has(self, key):
        return key in self.options

    def keys(self):
        """The keys this section sets, in file order."""
        return list(self.options)

    def line_of(self, key):
        """The line `key` is set on (None if the section does not set it)."""
        option = self.options.get(key)
        return option.line if option is not None else None

    def peek(self, key):
        """The raw text of `key` (None if not set) without counting it as used: for looking at
        a cfg before its layers read it."""
        option = self.options.get(key)
        return option.value if option is not None else None

    def used_options(self):
        """(key, raw value) of every option read so far."""
        return [(key, option.value) for key, option in self.options.items() if option.used]

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
        except (ValueError, OverflowError):
            raise self.error(f"{key}={shorten(raw)}: expected {expected}", key) from None

    def str(self, key, default=None):
        raw = self._raw(key)
        return default if raw is None else raw

    def int(self, key, default=None, low=None, high=None):
        """An integer option; with `low`/`high`, one outside that range is an error naming
        its line (checked where it is read, before anything is sized by it)."""
        value = self._typed(key, default, _parse_int, f"an integer ({INT_MIN}..{INT_MAX})")
        if value is not None and key in self.options:
            self.check_range(key, value, low, high)
        return value

    def float(self, key, default=None, low=None, high=None):
        value = self._typed(key, default, _parse_float, "a finite number")
        if value is not None and key in self.options:
            self.check_range(key, value, low, high)
        return value

    def check_range(self, key, value, low=None, high=None):
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                expected = f"a value >= {low}"
            elif low is None:
                expected = f"a value <= {high}"
            else:
                expected = f"a value in {low}..{high}"
            raise self.error(f"{key}={value}: expected {expected}", key)
        return value

    def bool(self, key, default=False):
        return bool(self._typed(key, int(default), _parse_int, "0 or 1"))

    def int_list(self, key, default=None):
        return self._typed(key, default, lambda v: [_parse_int(x) for x in _items(v)],
                           "a comma-separated list of integers")

    def float_list(self, key, default=None):
        return self._typed(key, default, lambda v: [_parse_float(x) for x in _items(v)],
                           "a comma-separated list of finite numbers")

    def require_positive(self, key, value):
        if value <= 0:
            raise self.error(f"{key}={value}: expected a positive value", key)
        return value

    def positive_int(self, key, default, high=None):
        """An integer that sizes something: at least 1 (and at most `high`), default included."""
        value = self.int(key, default)
        return self.check_range(key, self.require_positive(key, value), high=high)

    def unused(self):
        return [k for k, o in self.options.items() if not o.used]


INT_MIN, INT_MAX = -2 ** 31, 2 ** 31 - 1  # Darknet reads cfg integers into C ints
ECHO_LIMIT = 60  # characters of a cfg value or line an error message repeats


def shorten(text):
    """`text` as an error message repeats it: a megabyte-long line is cut, not echoed."""
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


def _parse_int(text):
    """Darknet reads integers with C's atoi: the longest leading [+-]digits prefix, the rest
    ignored, no digits giving 0. We follow it where cfgs rely on it (AlexeyAB's `filters=40#32`,
    an inline comment, is 40; "3.0" is 3) but refuse what is surely a mistake: no leading digits
    ("abc", which atoi reads as 0), a fractional number ("2.5", which atoi truncates to 2), and
    values a C int cannot hold (atoi's result is undefined there)."""
    if len(text) > 40:
        raise ValueError(text)  # int() of a huge digit string is slow, and cannot fit anyway
    try:
        value = int(text)
    except ValueError:
        match = _INT_PREFIX.match(text)
        if match is None:
            raise ValueError(text) from None
        if text[match.end():][:1] in (".", "e", "E"):
            number = float(text)  # "3.0", "1e3": whole numbers only; inf and nan fail below
            if not math.isfinite(number) or number != int(number):
                raise ValueError(text) from None
            value = int(number)
        else:
            value = int(match.group())
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(text)
    return value


_INT_PREFIX = re.compile(r"[+-]?[0-9]+")


def _parse_float(text):
    value = float(text)
    if not math.isfinite(value):  # inf, nan, 1e400: no cfg value means that
        raise ValueError(text)
    return value


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
                raise ConfigError(f"{path}:{number}: malformed section header "
                                  f"'{shorten(raw.strip())}'")
            sections.append(Section(line[1:-1].lower(), path, number))
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected 'key=value', got '{shorten(raw.strip())}'")
        if not sections:
            raise ConfigError(f"{path}:{number}: option '{shorten(line)}' before any [section]")
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
        raise ConfigError(f"{path}:{first.line}: the first section must be [net], got "
                          f"[{shorten(first.name)}]")
    return sections


def warn_unused(section, stream=None):
    stream = stream if stream is not None else sys.stderr  # looked up now, so redirection works
    for key in section.unused():
        print(f"Unused field: '{shorten(key)}' in [{shorten(section.name)}] at "
              f"{section.path}:{section.options[key].line}", file=stream)
    for key, line in section.repeated:
        print(f"Unused field: '{shorten(key)}' in [{shorten(section.name)}] at "
              f"{section.path}:{line} (repeated; line {section.options[key].line} is used)",
              file=stream)


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
            raise ConfigError(f"{path}:{number}: expected 'key=value', got '{shorten(line)}'")
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
    return read_text_lines(path, kind, ConfigError, strict=False)


def check_regular_file(path, kind, error_type):
    """One `error_type` line unless `path` is a regular file (a FIFO would make open() or read()
    wait forever, a device such as /dev/zero never ends). FileNotFoundError and
    IsADirectoryError pass through for the caller's own message."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise error_type(f"{path}: not a regular file, expected a {kind} file")


TEXT_FILE_LIMIT = 1 << 30  # bytes: cfgs, lists and names files are far smaller


def read_text_lines(path, kind, error_type, strict=True):
    """The lines of a text file (a BOM skipped), or one `error_type` line for a missing file, a
    folder, a FIFO or device, a file too large to be one, or (when `strict`) bytes that are not
    UTF-8; otherwise undecodable bytes become U+FFFD."""
    try:
        check_regular_file(path, kind, error_type)  # before open(): opening a FIFO waits
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > TEXT_FILE_LIMIT:
                raise error_type(f"{path}: {size} bytes is too large for a {kind} file")
            data = handle.read()
    except FileNotFoundError:
        raise error_type(f"{path}: {kind} file not found") from None
    except IsADirectoryError:
        raise error_type(f"{path}: is a directory, expected a {kind} file") from None
    except OSError as error:
        raise error_type(f"{path}: cannot read {kind} file ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig", errors="strict" if strict else "replace")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise error_type(f"{path}:{line}: the {kind} file is not UTF-8 text (byte "
                         f"0x{data[error.start]:02x})") from None
    return text.splitlines()
