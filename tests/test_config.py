"""Config loading: defaults, precedence, validation with useful messages, and round-trips."""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmnode.config import (
    DEFAULT_PORT,
    Config,
    HostPort,
    default_data_dir,
    load_config,
    write_config,
)
from hmnode.errors import ConfigError, UsageError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and precedence ----------------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.toml", env={})
    assert config == Config()
    assert config.listen == HostPort("0.0.0.0", DEFAULT_PORT)
    assert config.log_level == "info"
    assert config.log_format == "text"
    assert config.inventory_interval_s == 60.0
    assert not (tmp_path / "config.toml").exists()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "c.toml", ""), env={}) == Config()


def test_process_environment_is_ignored_when_env_is_given(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMNODE_LOG_LEVEL", "debug")
    assert load_config(tmp_path / "none.toml", env={}).log_level == "info"
    assert load_config(tmp_path / "none.toml").log_level == "debug"


LISTEN = ("node.listen", "listen", "HMNODE_LISTEN",
          ("1.1.1.1:1", "2.2.2.2:2", "[::3]:3"),
          (HostPort("1.1.1.1", 1), HostPort("2.2.2.2", 2), HostPort("::3", 3)))
LEVEL = ("log.level", "log_level", "HMNODE_LOG_LEVEL",
         ("warning", "error", "debug"), ("warning", "error", "debug"))


@pytest.mark.parametrize("setting", [LISTEN, LEVEL], ids=["node.listen", "log.level"])
def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path, setting) -> None:
    key, attr, env_var, (file_raw, env_raw, flag_raw), (file_v, env_v, flag_v) = setting
    section, name = key.split(".")
    missing = tmp_path / "missing.toml"
    path = write(tmp_path / "config.toml", f'[{section}]\n{name} = "{file_raw}"\n')
    default = getattr(Config(), attr)

    assert getattr(load_config(missing, env={}), attr) == default
    assert getattr(load_config(path, env={}), attr) == file_v
    assert getattr(load_config(path, env={env_var: env_raw}), attr) == env_v
    assert getattr(load_config(missing, env={env_var: env_raw}), attr) == env_v
    assert getattr(load_config(path, env={env_var: env_raw}, flags={key: flag_raw}), attr) == flag_v
    assert getattr(load_config(path, env={}, flags={key: flag_raw}), attr) == flag_v
    assert getattr(load_config(missing, env={}, flags={key: flag_raw}), attr) == flag_v
    # A flag that was not given (None) does not override anything.
    assert getattr(load_config(path, env={env_var: env_raw}, flags={key: None}), attr) == env_v


def test_settings_from_one_source_leave_the_others_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", '[log]\nlevel = "error"\nformat = "json"\n')
    config = load_config(path, env={"HMNODE_LISTEN": "127.0.0.1:9"},
                         flags={"inventory.interval_s": "5"})
    assert config == Config(listen=HostPort("127.0.0.1", 9), log_level="error",
                            log_format="json", inventory_interval_s=5.0)


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_config(tmp_path / "x", env={"HMNODE_LOG_LEVEL": "DEBUG"}).log_level == "debug"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_names_the_key_the_file_and_the_close_match(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", '[node]\nlisen = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "node.lisen" in message
    assert str(path) in message
    assert "node.listen" in message
    assert isinstance(info.value, UsageError)


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", "[node]\nzzzzzzzz = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "node.zzzzzzzz" in message and str(path) in message
    for key in ("node.listen", "log.level", "log.format", "inventory.interval_s"):
        assert key in message


@pytest.mark.parametrize("text, named", [
    ('[bogus]\nlisten = "0.0.0.0:1"\n', "bogus"),
    ('[nod]\nlisten = "0.0.0.0:1"\n', "nod"),
    ("toplevel = 1\n", "toplevel"),
])
def test_unknown_section_is_refused(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert named in str(info.value) and str(path) in str(info.value)


def test_known_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", 'node = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "node" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text, key", [
    ('[node]\nlisten = "nonsense"\n', "node.listen"),
    ('[node]\nlisten = "0.0.0.0:70000"\n', "node.listen"),
    ('[node]\nlisten = "0.0.0.0:-1"\n', "node.listen"),
    ('[node]\nlisten = "::1:4819"\n', "node.listen"),
    ("[node]\nlisten = 4819\n", "node.listen"),
    ("[inventory]\ninterval_s = -1\n", "inventory.interval_s"),
    ("[inventory]\ninterval_s = 0\n", "inventory.interval_s"),
    ("[inventory]\ninterval_s = 1e9\n", "inventory.interval_s"),
    ("[inventory]\ninterval_s = true\n", "inventory.interval_s"),
    ('[inventory]\ninterval_s = "often"\n', "inventory.interval_s"),
    ("[inventory]\ninterval_s = nan\n", "inventory.interval_s"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ("[log]\nlevel = 3\n", "log.level"),
    ('[log]\nformat = "xml"\n', "log.format"),
])
def test_bad_value_in_file_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", "[node\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)


def test_unreadable_config_path_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.mkdir()  # a directory where the file belongs: unreadable as a file even for root
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("var, value, key", [
    ("HMNODE_LISTEN", "nonsense", "node.listen"),
    ("HMNODE_LISTEN", "", "node.listen"),
    ("HMNODE_LOG_LEVEL", "loud", "log.level"),
    ("HMNODE_LOG_FORMAT", "yaml", "log.format"),
    ("HMNODE_INVENTORY_INTERVAL_S", "-1", "inventory.interval_s"),
    ("HMNODE_INVENTORY_INTERVAL_S", "soon", "inventory.interval_s"),
])
def test_bad_env_value_names_the_variable(tmp_path: Path, var: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "none.toml", env={var: value})
    assert var in str(info.value)
    assert key in str(info.value)


def test_bad_flag_value_says_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "none.toml", env={}, flags={"node.listen": "nope"})
    assert "node.listen" in str(info.value) and "command line" in str(info.value)


def test_bad_file_is_reported_even_when_env_and_flags_override(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", '[node]\nlisten = "nonsense"\n')
    with pytest.raises(ConfigError):
        load_config(path, env={"HMNODE_LISTEN": "1.2.3.4:5"}, flags={"node.listen": "1.2.3.4:6"})


# --- writing --------------------------------------------------------------------------------


def test_write_then_load_round_trips_a_non_default_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    config = Config(listen=HostPort("::1", 5000), log_level="debug", log_format="json",
                    inventory_interval_s=30.5)
    assert config != Config()
    write_config(path, config)
    assert load_config(path, env={}) == config
    assert not path.with_name("config.toml.tmp").exists()
    # Rewriting replaces the file rather than appending to it.
    write_config(path, Config())
    assert load_config(path, env={}) == Config()


@given(
    st.sampled_from(["debug", "info", "warning", "error"]),
    st.sampled_from(["text", "json"]),
    st.floats(min_value=1, max_value=86400, allow_nan=False),
    st.integers(min_value=0, max_value=65535),
)
def test_write_load_round_trip_property(level: str, fmt: str, interval: float, port: int) -> None:
    config = Config(listen=HostPort("127.0.0.1", port), log_level=level, log_format=fmt,
                    inventory_interval_s=interval)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        write_config(path, config)
        assert load_config(path, env={}) == config


# --- HostPort -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("[::1]:4819", HostPort("::1", 4819)),
    ("0.0.0.0:0", HostPort("0.0.0.0", 0)),
    ("127.0.0.1:65535", HostPort("127.0.0.1", 65535)),
    ("example.org:80", HostPort("example.org", 80)),
    ("[fe80::1]:1", HostPort("fe80::1", 1)),
])
def test_hostport_parses(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", [
    "::1:4819", "host:", ":80", "", "host", "[::1]", "[::1]:", "[::1]4819", "[1.2.3.4]:80",
    "[nonsense]:80", "host:65536", "host:-1", "host:+1", "host:8o", "host: 80",
    "0.0.0.0:\u0663", "0.0.0.0:\u00b2",
])
def test_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_hostport_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        HostPort.parse(4819)  # type: ignore[arg-type]


ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@given(st.one_of(ipv4, ipv6), ports)
def test_hostport_text_round_trips(host: str, port: int) -> None:
    hp = HostPort(host, port)
    text = str(hp)
    assert HostPort.parse(text) == hp
    assert text.startswith("[") == (ipaddress.ip_address(host).version == 6)


@given(st.text(max_size=30))
def test_hostport_parse_only_raises_value_error(text: str) -> None:
    try:
        hp = HostPort.parse(text)
    except ValueError:
        return
    assert 0 <= hp.port <= 65535
    assert HostPort.parse(str(hp)) == hp


@given(ipv4, st.text(st.characters(categories=("Nd",)), min_size=1, max_size=5))
def test_hostport_port_is_ascii_decimal_only(host: str, digits: str) -> None:
    try:
        hp = HostPort.parse(f"{host}:{digits}")
    except ValueError:
        assert not digits.isascii() or int(digits) > 65535
        return
    assert digits.isascii() and hp.port == int(digits)


# --- data dir location ----------------------------------------------------------------------


def test_default_data_dir_prefers_hmnode_data_dir() -> None:
    env = {"HMNODE_DATA_DIR": "/srv/hm", "XDG_DATA_HOME": "/xdg"}
    assert default_data_dir(env) == Path("/srv/hm")


def test_default_data_dir_expands_user_in_hmnode_data_dir() -> None:
    assert default_data_dir({"HMNODE_DATA_DIR": "~/hm"}) == Path.home() / "hm"


def test_default_data_dir_then_xdg_data_home() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/xdg"}) == Path("/xdg/hmnode")
    assert default_data_dir({"HMNODE_DATA_DIR": "", "XDG_DATA_HOME": "/xdg"}) == Path("/xdg/hmnode")


def test_default_data_dir_falls_back_to_local_share() -> None:
    expected = Path.home() / ".local/share/hmnode"
    assert default_data_dir({}) == expected
    assert default_data_dir({"XDG_DATA_HOME": ""}) == expected
    # The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
    assert default_data_dir({"XDG_DATA_HOME": "relative/dir"}) == expected


def test_an_empty_unknown_section_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[bogus]\n")
    with pytest.raises(ConfigError, match=r"unknown key bogus in .*config\.toml"):
        load_config(path, env={})


def test_connection_limits_are_settings_with_checked_ranges(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[transport]\nmax_connections_per_ip = 64\n")
    config = load_config(path, env={"HMNODE_MAX_CONNECTIONS": "512"})
    assert (config.max_connections, config.max_connections_per_ip) == (512, 64)
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(ConfigError, match="transport.max_connections"):
            load_config(path, env={"HMNODE_MAX_CONNECTIONS": bad})
    path.write_text("[transport]\nmax_connections_per_ip = true\n")
    with pytest.raises(ConfigError, match="transport.max_connections_per_ip"):
        load_config(path, env={})
