"""Instagram sessions, rate limits and the errors a user can act on.

A session is instaloader's own session file (`clipgram login USER` writes it);
the password is asked once, interactively, and never stored anywhere else.
Rate limiting ends a scrape instead of sleeping for many minutes: the tables
hold everything fetched so far, and the next scheduled run resumes.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import ContextManager

import instaloader
from instaloader import InstaloaderContext, RateController
from instaloader import exceptions as ig

from clipgram import lock
from clipgram.errors import ClipgramError

log = logging.getLogger("clipgram.scrape")


class ScrapeError(ClipgramError, RuntimeError):
    """A scrape that cannot go on; the message says what happened and what to do.

    `final`: retrying in a minute would fail the same way (a missing profile, a login wall).
    """

    def __init__(self, message: str, final: bool = True):
        super().__init__(message)
        self.final = final


class RateLimited(instaloader.AbortDownloadException):
    """Instagram asked us to wait longer than a run should. The next run resumes.

    An AbortDownloadException, so instaloader's own retry loops let it through.
    """

    def __init__(self, wait_s: float):
        super().__init__(f"Instagram asks to wait {wait_s / 60:.0f} min before the next request")
        self.wait_s = wait_s


class SessionBusy(RuntimeError):
    """Another scrape holds the session: two scrapers on one session get it rate-limited."""


class EndingRateController(RateController):
    """instaloader's rate controller, except that a long wait ends the scrape.

    Short waits (instaloader's pacing between queries) still sleep; a wait over
    `max_wait_s` (a 429's backoff, or a full sliding window) raises RateLimited.
    """

    def __init__(self, context: InstaloaderContext, max_wait_s: float):
        super().__init__(context)
        self.max_wait_s = max_wait_s

    def sleep(self, secs: float) -> None:
        if secs > self.max_wait_s:
            raise RateLimited(secs)
        super().sleep(secs)


def session_file(user: str, session_dir: str = "") -> Path:
    """Where USER's session lives: `session_dir`, or instaloader's default (~/.config/instaloader)."""
    if session_dir:
        return Path(session_dir).expanduser() / f"session-{user}"
    return Path(instaloader.instaloader.get_default_session_filename(user))


def login(user: str, session_dir: str = "",
          ask_password: Callable[[str], str] = getpass.getpass,
          ask_code: Callable[[str], str] = input,
          loader: instaloader.Instaloader | None = None) -> Path:
    """Log USER in (asking the password, and a 2FA code if needed) and save the session file."""
    loader = loader or instaloader.Instaloader(quiet=True)
    password = ask_password(f"Instagram password for {user}: ")
    try:
        try:
            loader.login(user, password)
        except ig.TwoFactorAuthRequiredException:
            loader.two_factor_login(ask_code("Two-factor code (from your app or SMS): ").strip())
    except ig.BadCredentialsException:
        raise ScrapeError(f"login as {user} failed: wrong password or code; "
                          f"run `clipgram login {user}` again") from None
    except (ig.LoginException, ig.ConnectionException) as e:
        raise explain(e, user, user) from None
    finally:
        del password  # only instaloader's session cookies outlive this call
    path = session_file(user, session_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    loader.save_session_to_file(str(path))
    os.chmod(path, 0o600)  # cookies are as good as the password
    log.info("session for %s saved to %s", user, path)
    return path


def loader_for(session_user: str, session_dir: str, max_wait_s: float) -> instaloader.Instaloader:
    """An Instaloader that uses USER's session (when given) and ends on long rate-limit waits."""
    loader = instaloader.Instaloader(
        quiet=True, download_pictures=False, download_videos=False, save_metadata=False,
        rate_controller=lambda context: EndingRateController(context, max_wait_s))
    if session_user:
        path = session_file(session_user, session_dir)
        if not path.exists():
            raise ScrapeError(f"no Instagram session for {session_user} at {path}: "
                              f"run `clipgram login {session_user}` first")
        loader.load_session_from_file(session_user, str(path))
    return loader


def session_lock(lock_dir: Path, session_user: str) -> ContextManager[None]:
    """Hold the session for one scraper; SessionBusy at once if another holds it."""
    name = session_user or "anonymous"
    return lock.hold(lock_dir / f"session-{name}.lock", 0.0, lambda holder: SessionBusy(
        f"another clipgram scrape is using the {name} session ({holder}); "
        "this run scrapes nothing and the next one catches up"))


def is_rate_limit(error: BaseException) -> bool:
    """A 429, or the 400 "Please wait a few minutes before you try again."."""
    text = str(error).lower()
    return (isinstance(error, (ig.TooManyRequestsException, RateLimited))
            or "please wait a few minutes" in text or "429" in text)


def explain(error: BaseException, account: str, session_user: str) -> ScrapeError:
    """instaloader's exception as one line saying what happened and what to do."""
    who = f"as {session_user}" if session_user else "anonymously"
    login_hint = ("run `clipgram login YOUR_USER` and ingest with --session YOUR_USER"
                  if not session_user else f"run `clipgram login {session_user}` again")
    text = str(error)
    if isinstance(error, ig.ProfileNotExistsException):
        return ScrapeError(f"profile {account!r} does not exist on Instagram (renamed or deleted?): "
                           "check the spelling")
    if isinstance(error, ig.PrivateProfileNotFollowedException):
        return ScrapeError(f"profile {account!r} is private and {session_user or 'you'} do not follow it: "
                           "follow it from that account, or log in as one that does")
    if "checkpoint" in text.lower() or "challenge" in text.lower():
        return ScrapeError(f"Instagram wants to verify the account ({who}): open instagram.com in a "
                           f"browser, complete the check, then {login_hint}")
    if isinstance(error, ig.LoginRequiredException) or "login" in text.lower():
        return ScrapeError(f"Instagram requires a login to see {account!r} ({who}): {login_hint}")
    if is_rate_limit(error):
        return ScrapeError(f"Instagram is rate-limiting requests ({who}): wait an hour before the "
                           "next run, and run one scrape per session at a time")
    return ScrapeError(f"scraping {account!r} failed ({who}): {text}", final=False)
