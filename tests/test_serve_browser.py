"""The web page at / in a real headless chromium (Debian's, driven by selenium with chromium-driver)
against the Serve app on 127.0.0.1: it opens on the first known user (or the one in the URL, `/?user=3`)
with a few others to click; see the history and the scored recommendations, click one to add an event
and watch both lists change; cold start (popularity, no score) and a refused write are shown."""

import shutil
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import fixed_replicas
from genrec.serve.deploy import load_serve_file, start

REPO = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_registered_model, tmp_path_factory):
    from ray import serve

    m = tiny_registered_model
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['uri']}", f"model.tracking_uri={m['tracking_uri']}", f"auth.token={TOKEN}",
        f"store.events_db={tmp_path_factory.mktemp('serve-browser') / 'events.sqlite'}", *fixed_replicas()])
    yield start(tree, port=free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def texts(browser, selector):
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_pick_a_user_see_history_and_recommendations_click_to_add_an_event(url, browser, tiny_registered_model):
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda b: "tiny-serve" in b.find_element(By.ID, "model").text)
    assert "retrieval" in browser.find_element(By.ID, "model").text
    # the user list is its own fetch, which may land after the model line
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#users option")) == 50)
    users = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#users option")]
    # the first load shows the first known user, and the URL names it
    wait.until(lambda b: len(texts(b, "#recs li")) == 10 and texts(b, "#history li"))
    assert browser.find_element(By.ID, "user").get_attribute("value") == users[0]
    assert parse_qs(urlparse(browser.current_url).query) == {"user": [users[0]]}
    history = texts(browser, "#history li")
    assert all("category_" in h for h in history)  # genres shown; the synthetic world has no titles
    recs = texts(browser, "#recs li")
    assert all("score" in r and "retrieval" in r for r in recs), recs
    # without the token the click is refused, and the page says so
    first = browser.find_elements(By.CSS_SELECTOR, "#recs li")[0]
    clicked = first.get_attribute("data-item")
    first.click()
    wait.until(lambda b: "401" in b.find_element(By.ID, "status").text)
    assert "header.authorization: a valid bearer token" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_elements(By.CSS_SELECTOR, "#recs li")[0].click()
    # the event is the last history entry now, and a seen item is no longer recommended
    wait.until(lambda b: f"item {clicked}" in (texts(b, "#history li") or [""])[-1])
    assert len(texts(browser, "#history li")) == min(len(history) + 1, 20)
    now = [e.get_attribute("data-item") for e in browser.find_elements(By.CSS_SELECTOR, "#recs li")]
    assert clicked not in now and len(now) == 10
    assert browser.find_element(By.ID, "status").text == ""
    # an unknown user: cold start, said on the page
    browser.find_element(By.ID, "user").clear()
    browser.find_element(By.ID, "user").send_keys("someone-new")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda b: "cold start" in b.find_element(By.ID, "cold").text)
    cold = texts(browser, "#recs li")
    assert len(cold) == 10 and all("popularity" in r and "score" not in r for r in cold), cold


def test_a_user_opens_by_url_and_a_few_are_offered_to_click(url, browser):
    wait = WebDriverWait(browser, 60)
    users = httpx.get(f"{url}/v1/users", params={"limit": 50}).json()
    user = users[3]
    shown = httpx.get(f"{url}/v1/users/{user}/history", params={"limit": 20}).json()["events"]
    browser.get(f"{url}/?user={user}")
    wait.until(lambda b: len(texts(b, "#recs li")) == 10 and len(texts(b, "#history li")) == len(shown))
    assert browser.find_element(By.ID, "user").get_attribute("value") == user
    assert [h.split(" ")[1] for h in texts(browser, "#history li")] == [str(e["item_id"]) for e in shown]
    picks = browser.find_elements(By.CSS_SELECTOR, "#picks a")
    assert [p.text for p in picks] == users[:10]
    picks[1].click()
    wait.until(lambda b: parse_qs(urlparse(b.current_url).query) == {"user": [users[1]]})
    wait.until(lambda b: b.find_element(By.ID, "user").get_attribute("value") == users[1])
    # a user the store never saw, by URL: the cold-start answer
    browser.get(f"{url}/?user=nobody-by-url")
    wait.until(lambda b: "cold start" in b.find_element(By.ID, "cold").text)
