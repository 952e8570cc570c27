"""The tripwire: a run whose first settled rows are overwhelmingly one permanent failure is doomed.

A wrong cluster, a wrong org or a card column that is really another column does not fail a row
here and there: it fails nearly every row with the same code (3010 "card number does not exist" for
a wrong cluster). Watching only the first ``rows`` settled rows of this invocation costs nothing per
row afterwards, and stops such a run after a few dozen rows instead of a whole file's quota.
"""

from __future__ import annotations

import math
from collections import Counter

from .api import NOT_APPLIED, is_permanent_code
from .ledger import RowResult, State

LIKELY_CAUSES: dict[str, str] = {
    "3010": ("the cards do not exist where the requests went: a wrong --cluster/--base-url (cards live "
             "in one region's cluster), credentials of another org or till, or a card column that is "
             "really another column (check the column mapping printed at the start)"),
    "3045": ("the external IDs are already on other cards: the file was loaded before under other card "
             "numbers, the two columns are swapped, or the external-ID column is another column"),
    "3046": "card numbers and external IDs do not match what the org holds: columns swapped or misaligned",
    "3050": ("the external IDs do not have the length the org requires (CONF_CARD_NUMBER_LENGTH): "
             "state it with --external-id-length so rows are checked before sending"),
    "3051": "the org cannot set external IDs (configuration), or the IDs are malformed for it",
    "3024": "the card column holds something else than card numbers (values too long)",
    "3029": "the card column holds something else than card numbers (values too long for the org)",
    "3042": "the customers are marked deleted: credentials of another org, or an outdated export",
    "3044": "the customers are disabled: credentials of another org, or an outdated export",
    "3035": "the org rejects this kind of update: ask Capillary support which call sets external IDs",
    NOT_APPLIED: ("the API answers success but the cards do not take the ID: the org may need more fields "
                  "(--extra-field statusLabel=...), or the PUT identifies cards differently; "
                  "run with --canary 5 and take its report to Capillary support"),
}
# Failures that are a decision, not the API refusing rows: never a sign of a doomed run.
IGNORED_CODES = frozenset({"changed_since"})   # revert's compare-and-set left a card alone
GENERIC_CAUSE = ("the same answer for nearly every row points at the setup, not the rows: check the "
                 "cluster, the org/till the credentials belong to, and the column mapping")


class Tripwire:
    """Watches the first ``rows`` settled rows; ``observe`` returns the stop message when it trips.

    It trips as soon as one permanent failure code reaches ``rate`` of the sample (it cannot fall
    below that any more), so a doomed run stops within its sample. After the sample it is disarmed.
    """

    def __init__(self, rate: float, rows: int, enabled: bool = True) -> None:
        self.rate = rate
        self.rows = rows
        self.armed = enabled
        self.seen = 0
        self._codes: Counter[str] = Counter()
        self._messages: dict[str, str] = {}
        self._needed = max(1, math.ceil(rate * rows - 1e-9))

    def observe(self, result: RowResult) -> str | None:
        if not self.armed:
            return None
        self.seen += 1
        code = result.error_code
        if result.state is State.FAILED and code and code not in IGNORED_CODES and is_permanent_code(code):
            self._codes[code] += 1
            self._messages.setdefault(code, result.error_message or "")
            if self._codes[code] >= self._needed:
                self.armed = False
                return self._message(code)
        if self.seen >= self.rows:
            self.armed = False
        return None

    def _message(self, code: str) -> str:
        n = self._codes[code]
        detail = self._messages.get(code) or ""
        cause = LIKELY_CAUSES.get(code, GENERIC_CAUSE)
        return (f"tripwire: {n} of the first {self.seen} settled rows ({100.0 * n / self.seen:.0f} %) failed "
                f"with {code}{f' ({detail})' if detail else ''}. Likely causes: {cause}. The rows settled so "
                f"far stay settled and the rest stay pending; fix the cause and rerun the same command "
                f"(or raise --tripwire-rate/--tripwire-rows, or --no-tripwire, if this is expected)")
