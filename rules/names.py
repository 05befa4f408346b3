"""Names of the 8 RFM types (domain.md section 3): codes, Chinese and English labels."""

from __future__ import annotations

# (R high, F high, M high) -> type code; names from domain.md section 3.
RFM_TYPES: dict[tuple[bool, bool, bool], str] = {
    (True, True, True): "important_value",
    (True, False, True): "important_development",
    (False, True, True): "important_retention",
    (False, False, True): "important_win_back",
    (True, True, False): "general_value",
    (True, False, False): "general_development",
    (False, True, False): "general_retention",
    (False, False, False): "general_win_back",
}
TYPE_NAMES: dict[str, tuple[str, str]] = {
    "important_value": ("重要价值客户", "important value"),
    "important_development": ("重要发展客户", "important development"),
    "important_retention": ("重要保持客户", "important retention"),
    "important_win_back": ("重要挽留客户", "important win-back"),
    "general_value": ("一般价值客户", "general value"),
    "general_development": ("一般发展客户", "general development"),
    "general_retention": ("一般保持客户", "general retention"),
    "general_win_back": ("一般挽留客户", "general win-back"),
}
