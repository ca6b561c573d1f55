"""Language data of the conversation layer: connectors, fillers, ellipsis and cancel words (ru, en).

Words are written normalized (lower case, ``ё`` → ``е``), like :func:`skill.values.tokenize` makes them.
Multi-word entries are space-separated; the longest entry that matches wins.
"""

from __future__ import annotations

import msgspec


class Lexicon(msgspec.Struct, frozen=True):
    """One locale's word lists."""

    # Between two requests: "выключи свет и поставь будильник", "turn off the lights, then play jazz".
    connectors: frozenset[str]
    # Only right after a comma or a full stop: ", а чайник включи", ", but".
    after_punctuation: frozenset[str]
    # A part made of these alone is no request ("слушай, включи свет", "set an alarm, please").
    fillers: frozenset[str]
    # What an elliptical follow-up may say besides its slot values: "а в спальне?", "make it eight instead".
    ellipsis: frozenset[str]
    # A whole utterance (fillers aside) that means "undo the last request".
    cancel: frozenset[str]


def _words(text: str) -> frozenset[str]:
    return frozenset(w.strip() for w in text.split("|") if w.strip())


LEXICONS: dict[str, Lexicon] = {
    "ru": Lexicon(
        connectors=_words(
            "и | а также | а еще | и еще | еще и | а потом | и потом | потом | затем | и затем | а затем"
            " | после этого | после чего | а после | также | плюс | и также"
        ),
        after_punctuation=_words("а | и | но | еще"),
        fillers=_words(
            "пожалуйста | слушай | слушай ка | ну | эм | э | так | ладно | окей | ок | давай | спасибо"
            " | будь добр | будь добра | если можно | хорошо | ага | да | быстро | срочно | прошу"
        ),
        ellipsis=_words(
            "а | и | в | во | на | к | ко | до | с | со | у | по | для | из | тоже | также | еще | тогда"
            " | лучше | давай | сделай | сделать | поставь | поменяй | измени | перенеси | переставь | нет"
            " | не | вместо | теперь | там | тут | здесь | это | этого | то | как | насчет | что | пусть"
            " | будет | все | же | пожалуйста | ну | а если | может | можно | давай ка | и там | тот"
            " | часов | часа | час | утра | вечера | дня | ночи"
        ),
        cancel=_words(
            "отмени | отмена | отменить | отменяй | отмени это | отмени его | отмени ее | отмени их"
            " | не надо | не нужно | забудь | забудь об этом | забудь это | передумал | передумала"
            " | я передумал | я передумала | отбой | нет отмени | удали это | отмени последнее"
            " | отмени последнюю команду | не делай этого | верни как было"
        ),
    ),
    "en": Lexicon(
        connectors=_words(
            "and | and then | then | and also | also | after that | and after that | plus | as well as"
            " | and afterwards | afterwards"
        ),
        after_punctuation=_words("and | but | also | then"),
        fillers=_words(
            "please | hey | ok | okay | well | um | uh | so | thanks | thank you | now | kindly"
            " | if you can | if possible | quickly | yes | yeah | alright"
        ),
        ellipsis=_words(
            "and | the | a | in | at | on | for | to | too | also | instead | make | it | then | what"
            " | about | how | please | now | no | as | well | change | move | do | same | one | set"
            " | of | there | this | that | one too | lets | actually | o clock | oclock | am"
            " | pm | in the | for the"
        ),
        cancel=_words(
            "cancel | cancel that | cancel it | cancel this | never mind | nevermind | forget it"
            " | forget that | undo | undo that | scratch that | i changed my mind | changed my mind"
            " | no cancel | cancel the last one | dont do that | stop that"
        ),
    ),
}

# Intents that mean "cancel whatever came last" (the catalog's generic cancel).
GENERIC_CANCEL = frozenset({"assistant.cancel"})


def lexicon(locale: str) -> Lexicon:
    """The word lists of ``locale`` (English for anything else)."""
    return LEXICONS.get(locale, LEXICONS["en"])
