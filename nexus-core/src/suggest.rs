//! "Did you mean …?" suggestions.

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&word_lower, &c.to_lowercase()), c))
        .filter(|(distance, c)| {
            let len = word.chars().count().max(c.chars().count());
            *distance > 0 && *distance <= (len / 3).max(1)
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
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
    }
}
