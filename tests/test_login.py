"""Issue 14, item 8: a login code Dropbox refuses is the user's code, not a network problem.
`app.py --login` runs as a user runs it, against the local test server's OAuth endpoints
(PKCE; a refused code gets HTTP 400 `invalid_grant`, as from Dropbox)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import REPO, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer



def start_login(tmp_path: Path, server: DropboxTestServer) -> tuple[subprocess.Popen, str]:
    """app.py --login, up to the authorize URL it prints."""
    book = write_xlsx(tmp_path / "inputs.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                         ["x", "/X", 0]]})
    env = server.client_env(credentials=False)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
         "--logs", str(tmp_path / "logs"), "--caBundle", server.ca_file, "--login", "--appKey", server.app_key,
         "--tokenFile", str(tmp_path / "home" / "token.json")],
        env=script_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        encoding="utf-8")
    url = ""
    while "code_challenge" not in url:
        line = process.stdout.readline()
        assert line, "no authorize URL printed"
        url = line.strip() if "code_challenge" in line else url
    return process, url


def code_for(server: DropboxTestServer, url: str) -> str:
    """What the user copies from the browser after allowing access."""
    query = parse_qs(urlparse(url).query)
    return server.authorize(query["client_id"][0], query["code_challenge"][0])


@pytest.mark.parametrize("case", ["mistyped", "already used"])
def test_a_refused_login_code_says_to_log_in_again_not_network_problem(tmp_path, server, case):
    if case == "already used":
        process, url = start_login(tmp_path, server)
        code = code_for(server, url)
        output, _ = process.communicate(code + "\n", timeout=60)
        assert process.returncode == 0, output
    else:
        code = "not-the-code-dropbox-showed"
    process, _ = start_login(tmp_path, server)
    output, _ = process.communicate(code + "\n", timeout=60)
    assert process.returncode == 3, output
    assert "the code was not accepted (wrong, already used, or older than 10 minutes)" in output, output
    assert "python app.py --login" in output
    assert "Network problem" not in output and "400 Client Error" not in output, output
    assert "Traceback" not in output
