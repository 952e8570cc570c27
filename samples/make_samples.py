"""Regenerate samples/cards.csv and samples/cards.xlsx (needs openpyxl: pip install -e .[test]).

Realistic backfill input: card numbers with leading zeros, and a handful of deliberately bad rows
(missing ID, placeholder, too long, Excel-mangled number, duplicate, conflict, unknown card).
"""

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows() -> list[tuple[str, str]]:
    rnd = random.Random(42)
    out = []
    for i in range(1, 191):
        card = f"{rnd.randint(0, 10**15 - 1):016d}" if i % 5 else f"00{rnd.randint(10**11, 10**12):013d}"
        out.append((card, f"EXT{i:07d}"))
    out += [
        ("0000123456789012", ""),                      # missing external ID
        ("0000123456789013", "N/A"),                   # placeholder
        ("0000123456789014", "X" * 51),                # longer than 50
        ("4.11111E+15", "EXT9000001"),                 # digits lost to Excel
        (out[3][0], out[3][1]),                        # exact duplicate: sent once
        ("0000123456789015", "EXT9000002"),            # conflict: same card, two IDs
        ("0000123456789015", "EXT9000003"),
        ("9990000000000001", "EXT9000004"),            # unknown card: 3010 from the API
        ("9990000000000002", "EXT9000005"),
        (" 0000123456789016\u00a0", "EXT9000006"),    # stray spaces are trimmed, zeros kept
    ]
    return out


def main() -> None:
    data = rows()
    with open(HERE / "cards.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["cardNumber", "cardExternalId", "note"])
        for card, ext in data:
            w.writerow([card, ext, ""])
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Cards"
    ws.append(["Card Number", "Card External ID", "note"])
    for card, ext in data:
        ws.append([card, ext, ""])
        ws.cell(row=ws.max_row, column=1).number_format = "@"
    ws.append([4111111111111111, "EXT9000007", "typed as a number: 16 digits, Excel kept 15"])
    ws.append([1234567, "EXT9000008", "a short number typed as a number is exact"])
    wb.save(HERE / "cards.xlsx")


if __name__ == "__main__":
    main()
