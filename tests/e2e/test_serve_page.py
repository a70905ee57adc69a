"""The chat page at `/`, in a real headless Chromium driven by selenium through the system's chromedriver.

A question typed into the page must come back streamed (several deltas), equal to the API's own greedy
answer, and visible in a screenshot; the thinking toggle shows the reasoning folded; a second question
is asked with the first exchange as history.
"""
from __future__ import annotations

import io
import shutil

import pytest
from serving import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
           ".ci/run installs them)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
openai = pytest.importorskip("openai", reason="the page tests compare with the openai client's answers")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tool_memorised_model, data_cache, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_page") / "serve.log"
    with running_server(tool_memorised_model[0], log, data_cache) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,700"):
        options.add_argument(arg)
    # An explicit driver path: selenium then never tries to download a browser or a driver.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model-name").text.endswith("final"))
        yield driver
    finally:
        driver.quit()


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def ask_page(driver, question: str):
    """Type a question, press Enter, wait for the answer to finish; its assistant bubble."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    driver.find_element(By.ID, "prompt").send_keys(question + "\n")
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) > before
        and d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("data-state") != "streaming")
    bubble = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
    assert bubble.get_attribute("data-state") == "done", bubble.text
    return bubble


def text_of(bubble, css: str) -> str:
    return bubble.find_element(By.CSS_SELECTOR, css).get_property("textContent")


def api_answer(client, messages, think=False):
    extra = {"extra_body": {"chat_template_kwargs": {"open_thinking": True}}} if think else {}
    return client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                          **extra).choices[0].message


def test_a_typed_question_gets_a_streamed_answer(browser, client, tmp_path):
    from PIL import Image

    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    question = "Tell me a story about a cat."
    bubble = ask_page(browser, question)
    expected = api_answer(client, [{"role": "user", "content": question}]).content
    assert expected and text_of(bubble, ".content") == expected
    assert int(bubble.get_attribute("data-chunks")) > 1, "the answer arrived in one piece, not streamed"

    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    page = Image.open(shot).convert("RGB")
    assert page.size[0] >= 900
    # The bubble, cut from the screenshot, shows rendered text: many shades, not a blank box.
    r = bubble.rect
    crop = page.crop((int(r["x"]), int(r["y"]), int(r["x"] + r["width"]), int(r["y"] + r["height"])))
    assert crop.width > 40 and len(crop.getcolors(maxcolors=1 << 20)) > 20
    Image.open(io.BytesIO(bubble.screenshot_as_png)).verify()


def test_thinking_is_shown_folded_and_the_next_question_carries_the_history(browser, client):
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    browser.find_element(By.ID, "think").click()
    first_q = "What is 37 * 43?"
    first = ask_page(browser, first_q)
    api_first = api_answer(client, [{"role": "user", "content": first_q}], think=True)
    details = first.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert details.is_displayed() and details.get_attribute("open") is None  # folded
    assert text_of(first, ".reasoning-text") == api_first.reasoning_content
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is not None  # unfolds on a click

    browser.find_element(By.ID, "think").click()  # thinking off for the second turn
    second_q = "hello"
    second = ask_page(browser, second_q)
    history = [{"role": "user", "content": first_q}, {"role": "assistant", "content": api_first.content or ""},
               {"role": "user", "content": second_q}]
    with_history = api_answer(client, history).content
    assert with_history != api_answer(client, history[-1:]).content, "the history must change the answer here"
    assert text_of(second, ".content") == with_history
    assert not second.find_element(By.CSS_SELECTOR, "details.reasoning").is_displayed()
