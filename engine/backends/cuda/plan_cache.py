"""Small records kept on disk across processes (cudnn_graph's fused-convolution plans, whose
runtime-compiled kernels take 0.05-0.75 s each to make): where they live, how they are named,
and writes that can neither leave a partial file nor fail inference.

The folder is $ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/darknet-engine, else
~/.cache/darknet-engine; ENGINE_CACHE_DIR set to "" turns the disk cache off. Each record is one JSON
file named by a hash of everything it depends on (its `identity`), which it also holds: a file
whose identity or format differs, that does not parse or was cut short, is removed and counts
as missing. Writes go to a temporary file renamed over the entry (os.replace), so a reader sees
the old record or the new one, never half of one. A folder that cannot be made or written turns
writing off for the process after one line on stderr; reading what is there goes on. Nothing is
ever evicted (entries are small); deleting the folder is safe.
"""

import hashlib
import json
import os
import sys
import tempfile

CACHE_VARIABLE = "ENGINE_CACHE_DIR"
FOLDER_NAME = "darknet-engine"
FORMAT = 1  # raised when a record's layout changes: older files are then never read

_said = set()  # folders whose write failure was reported (one line per process)


def cache_root(environ=None):
    """The engine's cache folder; None where ENGINE_CACHE_DIR is set to "" (off)."""
    environ = os.environ if environ is None else environ
    if CACHE_VARIABLE in environ:
        return environ[CACHE_VARIABLE] or None
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, FOLDER_NAME)


class RecordStore:
    """JSON records in one folder, each looked up by its identity (a JSON-able dict)."""

    def __init__(self, folder):
        self.folder = folder
        self.writable = True  # False after a failed write: no further tries this process

    @classmethod
    def default(cls, subfolder):
        """The store in `subfolder` of cache_root(); None when the disk cache is off."""
        root = cache_root()
        return None if root is None else cls(os.path.join(root, subfolder))

    def path(self, identity):
        text = json.dumps({"format": FORMAT, **identity}, sort_keys=True)
        return os.path.join(self.folder, hashlib.sha256(text.encode()).hexdigest()[:40] + ".json")

    def read(self, identity):
        """The record stored for `identity` (a dict), or None: missing, unreadable, or a file
        that is not one (removed)."""
        path = self.path(identity)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, ValueError):  # missing, unreadable, or not text
            if os.path.exists(path):
                self.remove(identity)
            return None
        try:
            record = json.loads(text)
            valid = (isinstance(record, dict) and record.get("format") == FORMAT  # as JSON has it
                     and record.get("identity") == json.loads(json.dumps(identity)))
        except ValueError:  # cut short, or not JSON
            valid = False
        if not valid:
            self.remove(identity)
            return None
        return record

    def write(self, identity, record):
        """Store `record` (a JSON-able dict) for `identity`, atomically; on any failure (the
        folder cannot be made, a read-only or full disk) one line on stderr, and no more
        writes."""
        if not self.writable:
            return False
        text = json.dumps({"format": FORMAT, "identity": identity, **record}, sort_keys=True)
        temporary = None
        try:
            os.makedirs(self.folder, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.folder, prefix=".writing-",
                                                     suffix=".json")
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, self.path(identity))
            return True
        except OSError as error:
            self.writable = False
            if temporary is not None:
                try:
                    os.remove(temporary)
                except OSError:
                    pass
            if self.folder not in _said:
                _said.add(self.folder)
                print(f"warning: not keeping compiled plans on disk ({error}); set "
                      f"{CACHE_VARIABLE} to a writable folder, or to \"\" to turn this off",
                      file=sys.stderr)
            return False

    def remove(self, identity):
        try:
            os.remove(self.path(identity))
        except OSError:
            pass
