//! "Did you mean …?" suggestions.

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    candidates
        .into_iter()
        .filter(|c| *c != word)
        // Distance ignoring case, then exact distance: `utc` suggests `UTC`, not `UCT`.
        .map(|c| (strsim::damerau_levenshtein(&word_lower, &c.to_lowercase()), strsim::damerau_levenshtein(word, c), c))
        .filter(|(distance, _, c)| {
            let len = word.chars().count().max(c.chars().count());
            *distance <= (len / 3).max(1)
        })
        .min_by_key(|(distance, exact, _)| (*distance, *exact))
        .map(|(_, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn suggests_near_names_only() {
        let names = ["build-api", "deploy-api", "backup-db"];
        assert_eq!(closest("biuld-api", names), Some("build-api"));
        assert_eq!(closest("deplyo-api", names), Some("deploy-api"));
        assert_eq!(closest("something-else", names), None);
        assert_eq!(closest("build-api", names), None);
        assert_eq!(closest("utc", ["UCT", "UTC"]), Some("UTC"));
    }
}
