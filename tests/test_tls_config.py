"""rediss:// settings: redis-py's ssl_* names from the URL or the settings, refused clearly when wrong."""

from __future__ import annotations

import pytest

from sharedpool.config import ManagerConfig, mask_url, tls_options
from sharedpool.errors import ConfigError

URL = "rediss://:redis-pw@cache.example.com:6380/2"


def test_url_query_and_settings_give_the_options_a_setting_winning() -> None:
    config = ManagerConfig(redis_url=URL + "?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false&ssl_cert_reqs=optional",
                           ssl_cert_reqs="required")
    options = tls_options(config)
    assert options.server_hostname == "cache.example.com"  # SNI and the hostname check use the URL's host
    assert (options.ca_certs, options.check_hostname, options.cert_reqs) == ("/etc/ca.pem", False, "required")
    assert config.default_database == 2


def test_defaults_verify_the_certificate_and_the_host() -> None:
    options = tls_options(ManagerConfig(redis_url=URL))
    assert (options.cert_reqs, options.check_hostname, options.min_version) == ("required", True, "TLSv1_3")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ssl_cert_reqs": "maybe"}, "invalid ssl_cert_reqs='maybe': one of required, optional, none"),
        ({"ssl_check_hostname": "perhaps"}, "invalid ssl_check_hostname='perhaps': true or false"),
        ({"ssl_min_version": "SSLv3"}, "invalid ssl_min_version='SSLv3': TLSv1_2 or TLSv1_3"),
    ],
)
def test_bad_values_name_the_field(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ManagerConfig(redis_url=URL, **settings)
    assert message in str(caught.value)


def test_ssl_settings_with_a_plain_url_are_refused_and_a_password_never_shown() -> None:
    with pytest.raises(ConfigError, match="invalid ssl_ca_certs='/etc/ca.pem': set only with a rediss:// redis_url"):
        ManagerConfig(redis_url="redis://127.0.0.1:6379/0", ssl_ca_certs="/etc/ca.pem")
    with pytest.raises(ConfigError) as caught:
        ManagerConfig(redis_url="redis://127.0.0.1:6379/0", ssl_password="key-secret")
    assert "key-secret" not in str(caught.value)


def test_passwords_are_masked_in_repr_and_urls() -> None:
    config = ManagerConfig(redis_url=URL + "?ssl_password=in-url-secret", ssl_password="setting-secret")
    shown = repr(config) + repr(tls_options(config)) + mask_url(config.redis_url)
    for secret in ("redis-pw", "in-url-secret", "setting-secret"):
        assert secret not in shown
