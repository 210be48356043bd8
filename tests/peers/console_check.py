#!/usr/bin/env python3
"""Drives the Outpost web console in headless Chromium through WebDriver (Selenium with Debian's
chromium-driver), as an operator would: sign in with an admin token, add a device, publish with
mosquitto_pub using its credentials and see the reading appear live, disable the device, sign
out; sign in with a read token and find no write controls, and a write through the API refused.

    console_check.py BASE_URL ADMIN_TOKEN READ_TOKEN MQTT_PORT [SCREENSHOT_DIR]

Prints one JSON object with what it saw and exits 0, or prints the failure and exits 1.
Screenshots of each page go to SCREENSHOT_DIR when given (docs/console/ holds the committed ones).
"""

import json
import os
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

base, admin_token, read_token, mqtt_port = sys.argv[1:5]
shots = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None

options = Options()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
# The console redraws its views every few seconds: an element found a moment ago may be gone.
wait = WebDriverWait(driver, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
seen = {}


def shot(name, width=1280, height=900):
    if shots:
        driver.set_window_size(width, height)
        time.sleep(0.3)
        driver.save_screenshot(os.path.join(shots, f"{name}.png"))
        driver.set_window_size(1280, 900)


def heading():
    return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "main h1"))).text


def sign_in(token):
    driver.get(base + "/#/login")
    field = wait.until(ec.element_to_be_clickable((By.ID, "token")))
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == "Overview")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "main table tbody tr"))


def sign_out():
    driver.find_element(By.ID, "signout").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == "Sign in")


try:
    # An unknown token is refused with a message; nothing opens.
    driver.get(base + "/")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == "Sign in")
    shot("sign-in")
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait.until(lambda d: "not accepted" in d.find_element(By.CSS_SELECTOR, "main .error").text)
    # The session cookie is HttpOnly: no script sees it.
    sign_in(admin_token)
    seen["cookie_visible_to_script"] = driver.execute_script("return document.cookie")
    seen["overview_subsystems"] = len(driver.find_elements(By.CSS_SELECTOR, "main table tbody tr"))
    shot("overview")

    # Add a device: its secret is shown once, with examples.
    driver.find_element(By.CSS_SELECTOR, "nav a[href='#/devices']").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == "Devices")
    wait.until(ec.element_to_be_clickable((By.ID, "add-device"))).click()
    driver.find_element(By.ID, "new-id").send_keys("console-1")
    driver.find_element(By.ID, "new-name").send_keys("Boiler room sensor")
    driver.find_element(By.ID, "new-tags").send_keys("boiler, hall-2")
    driver.find_element(By.CSS_SELECTOR, "form[aria-label='Add a device'] button[type=submit]").click()
    secret = wait.until(ec.visibility_of_element_located((By.ID, "secret"))).text.strip()
    assert len(secret) == 64, f"secret {secret!r}"
    panel = driver.find_element(By.ID, "secret-panel").text
    assert "mosquitto_pub" in panel and "console-1" in panel, panel
    wait.until(lambda d: any("console-1" in r.text for r in d.find_elements(By.CSS_SELECTOR, "main tbody tr")))
    shot("device-added")

    # The device page: the live view connects, then a reading published with its credentials
    # appears without a reload.
    driver.find_element(By.ID, "open-new").click()
    wait.until(lambda d: d.find_element(By.ID, "stream-state").get_attribute("data-state") == "open")
    pub = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port, "-u", "console-1", "-P", secret,
         "-q", "1", "-t", "devices/console-1/temp", "-m", '{"t":21.5}'],
        capture_output=True, text=True, timeout=20)
    assert pub.returncode == 0, pub.stderr
    started = time.monotonic()
    wait.until(lambda d: '{"t":21.5}' in d.find_element(By.ID, "readings").text)
    seen["live_reading_ms"] = round((time.monotonic() - started) * 1000)
    seen["reading_count"] = driver.find_element(By.ID, "reading-count").text
    shot("device-live")

    # Disable it: the page says so, and the device can no longer publish.
    driver.find_element(By.ID, "disable").click()
    wait.until(lambda d: d.find_elements(By.ID, "enable"))
    wait.until(lambda d: "disabled" in d.find_element(By.CSS_SELECTOR, "main .cards").text)
    refused = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port, "-u", "console-1", "-P", secret,
         "-q", "1", "-t", "devices/console-1/temp", "-m", '{"t":99}'],
        capture_output=True, text=True, timeout=20)
    seen["disabled_publish_exit"] = refused.returncode
    assert refused.returncode != 0, "a disabled device could still publish"
    shot("device-disabled")
    shot("device-disabled-phone", 390, 844)

    # Edit it: the new name is saved and shown.
    driver.find_element(By.CSS_SELECTOR, "details summary").click()
    name = wait.until(ec.element_to_be_clickable((By.ID, "edit-name")))
    name.clear()
    name.send_keys("Boiler room, north wall")
    driver.find_element(By.CSS_SELECTOR, "form[aria-label='Edit the device'] button[type=submit]").click()
    wait.until(lambda d: "Boiler room, north wall" in d.find_element(By.CSS_SELECTOR, "main .cards").text)

    # The other pages answer: drivers, apps, the configuration check.
    for page, title in (("drivers", "Drivers"), ("apps", "Apps"), ("config", "Configuration")):
        driver.find_element(By.CSS_SELECTOR, f"nav a[href='#/{page}']").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == title)
        time.sleep(0.5)
        shot(page)
    wait.until(lambda d: d.find_elements(By.ID, "config-ok"))
    seen["config_ok"] = True
    driver.find_element(By.CSS_SELECTOR, "nav a[href='#/overview']").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "main h1").text == "Overview")
    sign_out()

    # A read token: no write controls, and a write through the API is refused (403) even with
    # the session's CSRF token.
    sign_in(read_token)
    driver.get(base + "/#/devices")
    wait.until(lambda d: any("console-1" in r.text for r in d.find_elements(By.CSS_SELECTOR, "main tbody tr")))
    seen["read_add_buttons"] = len(driver.find_elements(By.ID, "add-device"))
    driver.get(base + "/#/devices/console-1")
    wait.until(lambda d: "console-1" in d.find_element(By.CSS_SELECTOR, "main h1").text)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "main .cards section"))
    seen["read_write_buttons"] = len(driver.find_elements(By.CSS_SELECTOR, "#enable, #disable, #rotate, form[aria-label='Send a command']"))
    seen["read_write_status"] = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/v1/session').then(r => r.json()).then(s =>
          fetch('/api/v1/devices/console-1/enable', {method: 'POST', headers: {'X-CSRF-Token': s.csrf}}))
          .then(r => done(r.status), e => done(String(e)));
    """)
    seen["no_csrf_status"] = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/v1/devices/console-1/enable', {method: 'POST'}).then(r => done(r.status), e => done(String(e)));
    """)
    shot("device-read-only")
    if shots:
        # The overview's charts need two samples of the history (10 s apart).
        driver.get(base + "/#/overview")
        WebDriverWait(driver, 40, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "main figure svg"))
        shot("overview")
    seen["secret"] = secret
    seen["ok"] = True
    print(json.dumps(seen))
except Exception as e:  # noqa: BLE001 - report anything with the page it happened on
    print(f"console check failed: {e!r}\nat {driver.current_url}\n{driver.find_element(By.TAG_NAME, 'body').text}",
          file=sys.stderr)
    sys.exit(1)
finally:
    driver.quit()
