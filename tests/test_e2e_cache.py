"""The response cache in the whole stack: per-user isolation, shared TMDB data, invalidation."""

from __future__ import annotations

import pytest

from fake_upstreams.data import PLEX_ACCOUNT_TOKEN, PLEX_ACCOUNT_TOKEN_2, TMDB_V4_TOKEN
from projectionist.vault import SecretBox, Vault

from test_e2e_credentials import RecordingClient

pytestmark = pytest.mark.e2e


def plex_server_token(stack, account_token: str) -> tuple[RecordingClient, str]:
    player = RecordingClient(stack)
    return player, player.server(player.login(account_token))["accessToken"]


def test_two_users_never_share_plex_entries(stack, clean_fakes):
    alice, token_a = plex_server_token(stack, PLEX_ACCOUNT_TOKEN)
    bob, token_b = plex_server_token(stack, PLEX_ACCOUNT_TOKEN_2)
    url = f"{stack.plex_url}/library/onDeck?includeMeta=1"  # a URL of this test only
    a1 = alice.request("GET", f"{url}&X-Plex-Token={token_a}")
    a2 = alice.request("GET", f"{url}&X-Plex-Token={token_a}")
    b1 = bob.request("GET", f"{url}&X-Plex-Token={token_b}")
    assert "fwd=uri-miss" in a1.headers["Cache-Status"] and "hit" in a2.headers["Cache-Status"]
    # Same URL, other account: never alice's entry, and the miss says so.
    assert "fwd=uri-miss" in b1.headers["Cache-Status"] and "detail=new-partition" in b1.headers["Cache-Status"]
    assert len([r for r in clean_fakes.requests["plex"] if r.path == "/library/onDeck"]) == 2
    assert a1.content == a2.content


def test_xml_and_json_are_cached_apart(stack, clean_fakes):
    player, token = plex_server_token(stack, PLEX_ACCOUNT_TOKEN)
    url = f"{stack.plex_url}/library/sections?X-Plex-Token={token}"
    as_json = player.request("GET", url, headers={"Accept": "application/json"})
    as_xml = player.request("GET", url, headers={"Accept": "application/xml"})
    assert as_json.headers["Content-Type"].startswith("application/json")
    assert as_xml.headers["Content-Type"].startswith("text/xml")
    again = player.request("GET", url, headers={"Accept": "application/xml"})
    assert "hit" in again.headers["Cache-Status"] and again.content == as_xml.content
    fresh = f"{stack.plex_url}/library/sections?includeMeta=2&X-Plex-Token={token}"
    player.request("GET", fresh, headers={"Accept": "application/json"})
    other_variant = player.request("GET", fresh, headers={"Accept": "application/xml"})
    assert "fwd=vary-miss" in other_variant.headers["Cache-Status"]


def test_a_new_sign_in_of_the_same_account_on_another_device_hits(stack, clean_fakes):
    """A fresh browser profile signs in again: new surrogate, new client identifier, same account,
    same partition."""
    first, token_1 = plex_server_token(stack, PLEX_ACCOUNT_TOKEN)
    second, token_2 = plex_server_token(stack, PLEX_ACCOUNT_TOKEN)
    url = f"{stack.plex_url}/library/sections/1/all?sort=titleSort&X-Plex-Container-Start=0&X-Plex-Container-Size=100"
    one = first.request("GET", f"{url}&X-Plex-Client-Identifier=profile-1&X-Plex-Token={token_1}")
    two = second.request("GET", f"{url}&X-Plex-Client-Identifier=profile-2&X-Plex-Product=Player&X-Plex-Token={token_2}",
                         headers={"X-Plex-Client-Identifier": "profile-2", "X-Plex-Session-Identifier": "s-2"})
    assert one.status_code == two.status_code == 200
    assert "hit" in two.headers["Cache-Status"] and two.content == one.content


def test_default_and_custom_key_users_share_tmdb_entries(stack, clean_fakes):
    custom = RecordingClient(stack)
    account = custom.login(PLEX_ACCOUNT_TOKEN)
    vault = Vault(stack.db_path, SecretBox.load(stack.home, create=False))
    user_id = vault.resolve(account).user_id
    vault.set_user_credential(user_id, "tmdb", TMDB_V4_TOKEN)
    try:
        first = custom.request("GET", "https://api.themoviedb.org/3/movie/27205",
                               headers={"Authorization": f"Bearer {account}"})
        anonymous = RecordingClient(stack)
        second = anonymous.request("GET", "https://api.themoviedb.org/3/movie/27205",
                                   headers={"Authorization": "Bearer placeholder"})
    finally:
        vault.delete_user_credential(user_id, "tmdb")
        vault.close()
    assert "fwd=uri-miss" in first.headers["Cache-Status"] and "hit" in second.headers["Cache-Status"]
    assert first.json() == second.json()
    assert len([r for r in clean_fakes.requests["tmdb"] if r.path == "/3/movie/27205"]) == 1


def test_timeline_stop_invalidates_on_deck_and_metadata(stack, clean_fakes):
    player, token = plex_server_token(stack, PLEX_ACCOUNT_TOKEN)
    on_deck = f"{stack.plex_url}/library/onDeck?X-Plex-Token={token}"
    metadata = f"{stack.plex_url}/library/metadata/1001?X-Plex-Token={token}"
    for url in (on_deck, metadata):
        player.request("GET", url)
        assert "hit" in player.request("GET", url).headers["Cache-Status"]
    playing = player.request("GET", f"{stack.plex_url}/:/timeline?ratingKey=1001&key=%2Flibrary%2Fmetadata%2F1001"
                                    f"&state=playing&time=60000&duration=8160000&X-Plex-Token={token}")
    assert playing.status_code == 200
    assert "hit" in player.request("GET", on_deck).headers["Cache-Status"]  # playing changes nothing cached
    stopped = player.request("GET", f"{stack.plex_url}/:/timeline?ratingKey=1001&key=%2Flibrary%2Fmetadata%2F1001"
                                    f"&state=stopped&time=120000&duration=8160000&X-Plex-Token={token}")
    assert stopped.status_code == 200
    stack.wait_usage("route = 'plex.timeline.stopped'")
    for url in (on_deck, metadata):
        assert "fwd=uri-miss" in player.request("GET", url).headers["Cache-Status"]
