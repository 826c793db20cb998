"""engine/config.py (and the cfg checks in engine/network.py): Darknet's cfg syntax, typed
options with defaults, "Unused field" warnings, and one clear error per kind of bad cfg."""

import os

import pytest

from engine.config import read_cfg, read_data_file, warn_unused
from engine.errors import ConfigError
from engine.network import Network

from helpers import write_cfg

SMALL_NET = {"batch": 2, "height": 4, "width": 4, "channels": 1}


def _cfg(tmp_path, text, name="t.cfg"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_syntax_comments_whitespace_sections(tmp_path):
    """# and ; comment lines, blank lines, whitespace anywhere in a line, case of section names,
    and line numbers kept for each option."""
    path = _cfg(tmp_path, "# a comment\n[net]\n  batch = 4 \n; another\n\nlearning_rate=\t0.5\n"
                          "[Convolutional]\nfil ters=8\nactivation = leaky\n\n[maxpool]\n")
    sections = read_cfg(path)
    assert [s.name for s in sections] == ["net", "convolutional", "maxpool"]
    net, conv, pool = sections
    assert net.int("batch") == 4 and net.float("learning_rate") == 0.5
    assert net.line_of("batch") == 3 and conv.line == 7 and net.line_of("height") is None
    assert conv.int("filters") == 8  # Darknet strips all whitespace, even inside a key
    assert conv.str("activation") == "leaky"
    assert pool.options == {}


def test_section_inspection_does_not_count_as_use(tmp_path):
    """keys/peek/line_of look at a section (network.darknet_of, models.fuse) without marking
    options used; used_options lists only what the getters read."""
    path = _cfg(tmp_path, "[net]\n[convolutional]\nfilters=8\nactivation=mish\nsize=3\n")
    conv = read_cfg(path)[1]
    assert conv.keys() == ["filters", "activation", "size"]
    assert conv.peek("activation") == "mish" and conv.peek("pad") is None
    assert conv.line_of("size") == 5
    assert conv.used_options() == [] and conv.unused() == ["filters", "activation", "size"]
    conv.int("filters")
    assert conv.used_options() == [("filters", "8")]


def test_typed_getters_and_defaults(tmp_path):
    path = _cfg(tmp_path, "[net]\ni=3\nwhole=3.0\nf=.25\nb=1\nints=1,2, 3\nfloats=0.1,.5\ns=abc\n")
    s = read_cfg(path)[0]
    assert s.int("i") == 3 and s.int("whole") == 3 and s.float("f") == 0.25
    assert s.bool("b") is True and s.bool("missing") is False and s.bool("missing", True) is True
    assert s.int_list("ints") == [1, 2, 3] and s.float_list("floats") == [0.1, 0.5]
    assert s.str("s") == "abc"
    assert s.int("absent", 7) == 7 and s.float("absent", 1.5) == 1.5 and s.str("absent") is None


def test_darknet_defaults_in_layers(tmp_path):
    """Defaults from Darknet's parser: conv activation logistic, size 1, stride 1, no padding;
    maxpool size = stride, padding = size-1; net learning_rate .001, momentum .9, decay .0001."""
    path = write_cfg(tmp_path / "d.cfg", SMALL_NET,
                     "[convolutional]\nfilters=2\n\n[maxpool]\nstride=2\n\n[connected]\noutput=3")
    net = Network(path, quiet=True)
    conv, pool, fc = net.layers
    assert (conv.size, conv.stride, conv.padding, conv.activation) == (1, 1, 0, "logistic")
    assert (pool.size, pool.padding, pool.out_shape) == (2, 1, (2, 2, 2))
    assert fc.activation == "logistic"
    o = net.options
    assert (o.learning_rate, o.momentum, o.decay, o.policy, o.subdivisions) == \
        (0.001, 0.9, 0.0001, "constant", 1)


def test_pad_means_half_the_size(tmp_path):
    path = write_cfg(tmp_path / "p.cfg", SMALL_NET,
                     "[convolutional]\nfilters=2\nsize=5\npad=1\npadding=7\n")
    layer = Network(path, quiet=True).layers[0]
    assert layer.padding == 2 and layer.out_shape == (2, 4, 4)


def test_unused_field_warning_names_key(tmp_path, capsys):
    """Keys a section does not use are reported as Darknet does ("Unused field")."""
    path = write_cfg(tmp_path / "u.cfg", dict(SMALL_NET, bogus_net_key=1),
                     "[convolutional]\nfilters=2\nsizee=3\n")
    Network(path)
    err = capsys.readouterr().err
    assert "Unused field" in err and "'sizee'" in err and "'bogus_net_key'" in err
    assert "'filters'" not in err
    Network(path, quiet=True)
    assert "Unused field" not in capsys.readouterr().err


def test_warn_unused_to_stream(tmp_path):
    import io

    s = read_cfg(_cfg(tmp_path, "[net]\na=1\nb=2\n"))[0]
    s.int("a")
    out = io.StringIO()
    warn_unused(s, stream=out)
    assert "Unused field: 'b'" in out.getvalue() and "'a'" not in out.getvalue()


# ---- errors --------------------------------------------------------------------------------------
def test_missing_cfg(tmp_path):
    missing = str(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError, match="nope.cfg: cfg file not found"):
        Network(missing)


def test_unreadable_cfg(tmp_path):
    """A directory, or a file without read permission (when not root), is a clear error."""
    with pytest.raises(ConfigError, match="is a directory"):
        read_cfg(str(tmp_path))
    if os.geteuid() != 0:
        path = _cfg(tmp_path, "[net]\n")
        os.chmod(path, 0)
        with pytest.raises(ConfigError, match="cannot read cfg file"):
            read_cfg(path)


def test_unknown_section(tmp_path):
    path = write_cfg(tmp_path / "s.cfg", SMALL_NET, "[convolutional]\nfilters=2\n\n[frobnicate]\nx=1")
    with pytest.raises(ConfigError) as info:
        Network(path, quiet=True)
    message = str(info.value)
    assert f"{path}:10" in message and "[frobnicate]" in message and "unknown section" in message


@pytest.mark.parametrize("body, key, expected", [
    ("[convolutional]\nfilters=abc\n", "filters", "an integer"),
    ("[convolutional]\nfilters=2\nsize=2.5\n", "size", "an integer"),
    ("[dropout]\nprobability=half\n", "probability", "a finite number"),
    ("[convolutional]\nfilters=2\nbatch_normalize=yes\n", "batch_normalize", "0 or 1"),
])
def test_wrong_typed_value_names_file_line_key_expected(tmp_path, body, key, expected):
    path = write_cfg(tmp_path / "w.cfg", SMALL_NET, body)
    line = 7 + body.splitlines().index(next(l for l in body.splitlines() if l.startswith(key)))
    with pytest.raises(ConfigError) as info:
        Network(path, quiet=True)
    message = str(info.value)
    assert f"{path}:{line}:" in message, message
    assert f"{key}=" in message and f"expected {expected}" in message, message


def test_wrong_typed_net_option(tmp_path):
    path = _cfg(tmp_path, "[net]\nbatch=1\nheight=4\nwidth=4\nchannels=1\nlearning_rate=fast\n"
                          "[connected]\noutput=2\n")
    with pytest.raises(ConfigError, match=r"t\.cfg:6: \[net\] learning_rate=fast: expected a finite number"):
        Network(path, quiet=True)


def test_first_section_must_be_net(tmp_path):
    path = _cfg(tmp_path, "# comment\n[convolutional]\nfilters=2\n[net]\nbatch=1\n")
    with pytest.raises(ConfigError, match=r"t\.cfg:2: the first section must be \[net\], got \[convolutional\]"):
        read_cfg(path)


def test_network_alias_for_net(tmp_path):
    path = _cfg(tmp_path, "[network]\nbatch=1\nheight=2\nwidth=2\nchannels=1\n[connected]\noutput=2\n")
    assert Network(path, quiet=True).layers[0].out_shape == (2, 1, 1)


def test_option_before_any_section(tmp_path):
    path = _cfg(tmp_path, "batch=1\n[net]\n")
    with pytest.raises(ConfigError, match=r"t\.cfg:1: option 'batch=1' before any \[section\]"):
        read_cfg(path)


def test_malformed_lines(tmp_path):
    with pytest.raises(ConfigError, match=r":2: expected 'key=value'"):
        read_cfg(_cfg(tmp_path, "[net]\njustaword\n"))
    with pytest.raises(ConfigError, match=r":1: malformed section header"):
        read_cfg(_cfg(tmp_path, "[net\nbatch=1\n"))
    with pytest.raises(ConfigError, match="no sections"):
        read_cfg(_cfg(tmp_path, "# nothing\n"))


def test_net_without_layers(tmp_path):
    with pytest.raises(ConfigError, match="no layers"):
        Network(write_cfg(tmp_path / "e.cfg", SMALL_NET, ""), quiet=True)


@pytest.mark.parametrize("body, words", [
    ("[maxpool]\nsize=8\nstride=1\npadding=0\n", "maxpool size=8 does not fit the 4x4x1 input"),
    ("[convolutional]\nfilters=2\nsize=7\n", "does not fit"),
    ("[convolutional]\nfilters=3\ngroups=2\n", "groups=2 must divide"),
    ("[convolutional]\nfilters=0\n", "filters=0: expected a positive value"),
    ("[convolutional]\nfilters=2\nactivation=swishy\n", "unknown activation 'swishy'"),
    ("[route]\nlayers=3\n", "refers to layer 3"),
    ("[softmax]\ngroups=3\n", "groups=3 must divide"),
    ("[upsample]\nstride=-3\n", "does not fit"),
    ("[dropout]\nprobability=1\n", "expected 0 <= p < 1"),
])
def test_layer_sizes_that_do_not_fit(tmp_path, body, words):
    """Bad layer geometry is caught while building, with the section's file and line."""
    path = write_cfg(tmp_path / "g.cfg", SMALL_NET, body)
    with pytest.raises(ConfigError) as info:
        Network(path, quiet=True)
    assert words in str(info.value) and f"{path}:" in str(info.value)


def test_route_of_different_sizes_is_refused(tmp_path):
    """Darknet silently builds a 0-size route; the engine refuses it."""
    path = write_cfg(tmp_path / "r.cfg", SMALL_NET,
                     "[convolutional]\nfilters=2\n\n[maxpool]\nsize=2\nstride=2\n\n[route]\nlayers=0,1")
    with pytest.raises(ConfigError, match="heights and widths must match"):
        Network(path, quiet=True)


def test_net_option_checks(tmp_path):
    with pytest.raises(ConfigError, match="subdivisions=3 must divide batch=4"):
        Network(_cfg(tmp_path, "[net]\nbatch=4\nsubdivisions=3\nheight=2\nwidth=2\nchannels=1\n"
                               "[connected]\noutput=2\n"), quiet=True)
    with pytest.raises(ConfigError, match="policy=cosine"):
        Network(_cfg(tmp_path, "[net]\npolicy=cosine\nheight=2\nwidth=2\nchannels=1\n"
                               "[connected]\noutput=2\n"), quiet=True)
    with pytest.raises(ConfigError, match="steps"):
        Network(_cfg(tmp_path, "[net]\npolicy=steps\nsteps=1,2\nscales=.1\nheight=2\nwidth=2\n"
                               "channels=1\n[connected]\noutput=2\n"), quiet=True)


def test_data_file(tmp_path):
    path = _cfg(tmp_path, "classes= 10\n# c\n train = a/b.txt\nbackup=backup/\n", "x.data")
    assert read_data_file(path) == {"classes": "10", "train": "a/b.txt", "backup": "backup/"}
    with pytest.raises(ConfigError, match="data file not found"):
        read_data_file(str(tmp_path / "none.data"))


def test_repeated_key_first_wins_and_repeat_is_unused(tmp_path, capsys):
    """Darknet's option_find returns the first occurrence of a key (src/option_list.c); the
    repeat is never read, so it is reported as an unused field."""
    path = write_cfg(tmp_path / "r.cfg", SMALL_NET,
                     "[convolutional]\nfilters=2\nsize=3\nfilters=5\n")
    net = Network(path)
    assert net.layers[0].filters == 2
    err = capsys.readouterr().err
    assert "Unused field: 'filters'" in err and f"{path}:10" in err
    data = tmp_path / "d.data"
    data.write_text("classes=3\nclasses=4\n")
    assert read_data_file(str(data))["classes"] == "3"


def test_crlf_and_byte_order_mark(tmp_path):
    """A cfg saved by a Windows editor (BOM, CRLF line ends) reads the same."""
    path = tmp_path / "win.cfg"
    path.write_bytes(b"\xef\xbb\xbf[net]\r\nbatch=2\r\n\r\n[maxpool]\r\nsize=2\r\n")
    net, pool = read_cfg(str(path))
    assert net.name == "net" and net.int("batch") == 2 and pool.int("size") == 2
