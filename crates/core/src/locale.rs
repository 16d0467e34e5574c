//! Locales for the date and number helpers of templates: reading a locale as contacts and
//! configuration write it, and formatting numbers with its decimal point and digit grouping. The
//! data is glibc's, as `pure-rust-locales` carries it (chrono formats localized dates with it).

use pure_rust_locales::{Locale, locale_match};

/// Languages whose usual country is not the language code in capitals (`de` → `de_DE` works by
/// that rule; `en` → `en_US` needs this list).
const MAIN_COUNTRY: [(&str, &str); 22] = [
    ("ar", "ar_EG"),
    ("cs", "cs_CZ"),
    ("da", "da_DK"),
    ("el", "el_GR"),
    ("en", "en_US"),
    ("et", "et_EE"),
    ("fa", "fa_IR"),
    ("he", "he_IL"),
    ("hi", "hi_IN"),
    ("ja", "ja_JP"),
    ("ko", "ko_KR"),
    ("nb", "nb_NO"),
    ("nn", "nn_NO"),
    ("no", "nb_NO"),
    ("sl", "sl_SI"),
    ("sq", "sq_AL"),
    ("sr", "sr_RS"),
    ("sv", "sv_SE"),
    ("uk", "uk_UA"),
    ("vi", "vi_VN"),
    ("zh", "zh_CN"),
    ("ca", "ca_ES"),
];

/// Reads `de-DE`, `de_DE`, `pt_br` or a bare language (`de`, `en`: its usual country). `None`
/// for a locale glibc does not know.
pub fn parse_locale(text: &str) -> Option<Locale> {
    let text = text.trim();
    let (language, country) = match text.split_once(['-', '_']) {
        Some((l, c)) => (l.to_ascii_lowercase(), Some(c.to_ascii_uppercase())),
        None => (text.to_ascii_lowercase(), None),
    };
    if language.is_empty() || !language.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    match country {
        Some(country) => Locale::try_from(format!("{language}_{country}").as_str()).ok(),
        None => MAIN_COUNTRY
            .iter()
            .find(|(l, _)| *l == language)
            .map_or_else(
                || {
                    Locale::try_from(
                        format!("{language}_{}", language.to_ascii_uppercase()).as_str(),
                    )
                },
                |(_, locale)| Locale::try_from(*locale),
            )
            .ok(),
    }
}

/// `value` with `decimals` digits after the locale's decimal point and its digits grouped as the
/// locale groups them (`1,234.50` in `en_US`, `1.234,50` in `de_DE`, `12,34,567` in `hi_IN`).
/// `None` decimals keeps the digits the value has (at most 10).
pub fn format_number(value: f64, decimals: Option<usize>, locale: Locale) -> String {
    let text = match decimals {
        Some(d) => format!("{:.*}", d.min(10), value.abs()),
        None => {
            let shortest = format!("{}", value.abs());
            match shortest.split_once('.') {
                Some((_, fraction)) if fraction.len() > 10 => format!("{:.10}", value.abs()),
                _ => shortest,
            }
        }
    };
    let (integer, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let point = locale_match!(locale => LC_NUMERIC::DECIMAL_POINT);
    let separator = locale_match!(locale => LC_NUMERIC::THOUSANDS_SEP);
    let grouping = locale_match!(locale => LC_NUMERIC::GROUPING);
    let mut out = String::new();
    if value < 0.0 && text.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
        out.push('-');
    }
    out.push_str(&group(integer, separator, grouping));
    if !fraction.is_empty() {
        out.push_str(point);
        out.push_str(fraction);
    }
    out
}

/// Inserts `separator` into a run of digits from the right, group sizes as POSIX `grouping` says:
/// each entry is the next group's size, the last one repeats, and -1 (or 0) ends the grouping.
fn group(digits: &str, separator: &str, grouping: &[i64]) -> String {
    if separator.is_empty() {
        return digits.to_owned();
    }
    let mut groups = Vec::new();
    let mut rest = digits;
    let mut sizes = grouping.iter().copied();
    let mut size = sizes.next().unwrap_or(-1);
    while size > 0 && rest.len() > size as usize {
        let (head, tail) = rest.split_at(rest.len() - size as usize);
        groups.push(tail);
        rest = head;
        size = sizes.next().unwrap_or(size);
    }
    groups.push(rest);
    groups.reverse();
    groups.join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_are_read_as_people_write_them() {
        assert_eq!(parse_locale("de-DE"), Some(Locale::de_DE));
        assert_eq!(parse_locale("de_de"), Some(Locale::de_DE));
        assert_eq!(parse_locale("pt-br"), Some(Locale::pt_BR));
        assert_eq!(parse_locale("de"), Some(Locale::de_DE));
        assert_eq!(parse_locale("en"), Some(Locale::en_US));
        assert_eq!(parse_locale(" fr "), Some(Locale::fr_FR));
        assert_eq!(parse_locale("sv"), Some(Locale::sv_SE));
        for unknown in ["", "xx", "de-XX", "1", "en_US; drop"] {
            assert_eq!(parse_locale(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn numbers_take_the_locales_point_and_grouping() {
        assert_eq!(format_number(1234.5, Some(2), Locale::en_US), "1,234.50");
        assert_eq!(format_number(1234.5, Some(2), Locale::de_DE), "1.234,50");
        assert_eq!(
            format_number(1234567.0, Some(0), Locale::fr_FR),
            "1\u{202f}234\u{202f}567"
        );
        assert_eq!(group("1234567", ",", &[3, 2]), "12,34,567");
        assert_eq!(group("1234567", ".", &[-1]), "1234567");
        assert_eq!(format_number(-0.5, None, Locale::en_US), "-0.5");
        assert_eq!(format_number(-0.001, Some(2), Locale::en_US), "0.00");
        assert_eq!(format_number(999.0, None, Locale::de_DE), "999");
        assert_eq!(format_number(49.0, Some(2), Locale::POSIX), "49.00");
        assert_eq!(
            format_number(1.0 / 3.0, None, Locale::en_US),
            "0.3333333333"
        );
    }
}
