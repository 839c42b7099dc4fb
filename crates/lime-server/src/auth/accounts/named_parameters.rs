//! The operator's query names its values `:username` and `:domain`; the drivers
//! want positions. This turns one into the other, and refuses any other name.
//!
//! Text in quotes (`'...'`, `"..."`, `` `...` ``) and comments (`-- ...`,
//! `/* ... */`) is copied as it is, and `::` (a PostgreSQL cast) is not a name. A
//! quote inside a string literal is written by doubling it (`'it''s'`); MySQL's
//! backslash escapes are not followed.

use super::AccountError;

/// A value the query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parameter {
    /// The user part of the account's SIP address.
    Username,
    /// The domain part of the account's SIP address.
    Domain,
}

impl Parameter {
    fn from_name(name: &str) -> Option<Parameter> {
        match name {
            "username" => Some(Parameter::Username),
            "domain" => Some(Parameter::Domain),
            _ => None,
        }
    }
}

/// How a backend writes positional parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placeholders {
    /// A `?` for each use, values bound in order of use (MySQL, SQLite).
    QuestionMarks,
    /// `$1`, `$2`: one number per name, in order of first use (PostgreSQL).
    Numbered,
}

/// The operator's query in a backend's positional form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PositionalQuery {
    /// The SQL the driver runs.
    pub sql: String,
    /// What to bind to each position, in order.
    pub parameters: Vec<Parameter>,
}

impl PositionalQuery {
    /// The values to bind, in order, for one account.
    pub fn values<'a>(&self, username: &'a str, domain: &'a str) -> Vec<&'a str> {
        self.parameters
            .iter()
            .map(|parameter| match parameter {
                Parameter::Username => username,
                Parameter::Domain => domain,
            })
            .collect()
    }
}

/// Translates `query` into `style`. Fails on a `:name` other than `:username` and
/// `:domain`, and on a query that never uses `:username`.
pub(super) fn translate(query: &str, style: Placeholders) -> Result<PositionalQuery, AccountError> {
    let bytes = query.as_bytes();
    let mut sql = String::with_capacity(query.len());
    let mut parameters = Vec::new();
    // Everything before `copied` is in `sql` already.
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let next = bytes.get(at + 1).copied();
        at = match (bytes[at], next) {
            (quote @ (b'\'' | b'"' | b'`'), _) => end_of(bytes, at + 1, &[quote]),
            (b'-', Some(b'-')) => end_of(bytes, at + 2, b"\n"),
            (b'/', Some(b'*')) => end_of(bytes, at + 2, b"*/"),
            (b':', Some(b':')) => at + 2,
            (b':', Some(first)) if first.is_ascii_alphabetic() || first == b'_' => {
                let end = (at + 1..bytes.len())
                    .find(|&index| !(bytes[index].is_ascii_alphanumeric() || bytes[index] == b'_'))
                    .unwrap_or(bytes.len());
                let name = &query[at + 1..end];
                let parameter =
                    Parameter::from_name(name).ok_or_else(|| AccountError::BadQuery {
                        reason: format!(
                            "unknown placeholder :{name} (only :username and :domain are filled in)"
                        ),
                    })?;
                sql.push_str(&query[copied..at]);
                match style {
                    Placeholders::QuestionMarks => {
                        parameters.push(parameter);
                        sql.push('?');
                    }
                    Placeholders::Numbered => {
                        let index = match parameters.iter().position(|&seen| seen == parameter) {
                            Some(index) => index,
                            None => {
                                parameters.push(parameter);
                                parameters.len() - 1
                            }
                        };
                        sql.push_str(&format!("${}", index + 1));
                    }
                }
                copied = end;
                end
            }
            _ => at + 1,
        };
    }
    sql.push_str(&query[copied..]);
    if !parameters.contains(&Parameter::Username) {
        return Err(AccountError::BadQuery {
            reason: "the query never uses :username".into(),
        });
    }
    Ok(PositionalQuery { sql, parameters })
}

/// Where the text that starts at `from` and ends with `terminator` ends (just past
/// the terminator), or the end of the query when it never comes.
fn end_of(bytes: &[u8], from: usize, terminator: &[u8]) -> usize {
    bytes
        .get(from..)
        .and_then(|rest| rest.windows(terminator.len()).position(|w| w == terminator))
        .map_or(bytes.len(), |offset| from + offset + terminator.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Parameter::{Domain, Username};
    use Placeholders::{Numbered, QuestionMarks};

    fn translated(query: &str, style: Placeholders) -> (String, Vec<Parameter>) {
        let positional = translate(query, style).unwrap();
        (positional.sql, positional.parameters)
    }

    fn refusal(query: &str) -> String {
        translate(query, QuestionMarks).unwrap_err().to_string()
    }

    #[test]
    fn question_marks_repeat_values_in_order_of_use() {
        let (sql, parameters) = translated(
            "SELECT p FROM a WHERE (u = :username OR alias = :username) AND d = :domain",
            QuestionMarks,
        );
        assert_eq!(sql, "SELECT p FROM a WHERE (u = ? OR alias = ?) AND d = ?");
        assert_eq!(parameters, [Username, Username, Domain]);
    }

    #[test]
    fn numbers_go_one_per_name_in_order_of_first_use() {
        let (sql, parameters) = translated(
            "SELECT p FROM a WHERE d = :domain AND (u = :username OR alias = :username)",
            Numbered,
        );
        assert_eq!(
            sql,
            "SELECT p FROM a WHERE d = $1 AND (u = $2 OR alias = $2)"
        );
        assert_eq!(parameters, [Domain, Username]);
    }

    #[test]
    fn domain_may_be_left_out() {
        let (sql, parameters) = translated("SELECT p, alg FROM a WHERE u=:username", Numbered);
        assert_eq!(sql, "SELECT p, alg FROM a WHERE u=$1");
        assert_eq!(parameters, [Username]);
    }

    #[test]
    fn names_in_quotes_and_comments_are_left_alone() {
        let query = "SELECT p, ':domain' AS \"a:b\", `c:d` FROM a -- :other\n\
                     WHERE u = :username /* :x */ AND note <> 'it''s :x'";
        let (sql, parameters) = translated(query, QuestionMarks);
        assert_eq!(
            sql,
            "SELECT p, ':domain' AS \"a:b\", `c:d` FROM a -- :other\n\
             WHERE u = ? /* :x */ AND note <> 'it''s :x'"
        );
        assert_eq!(parameters, [Username]);
    }

    #[test]
    fn postgresql_casts_are_not_names() {
        let (sql, parameters) = translated(
            "SELECT p::text, alg::text FROM a WHERE u = :username::varchar AND d = :domain",
            Numbered,
        );
        assert_eq!(
            sql,
            "SELECT p::text, alg::text FROM a WHERE u = $1::varchar AND d = $2"
        );
        assert_eq!(parameters, [Username, Domain]);
    }

    #[test]
    fn a_lone_colon_is_kept() {
        let (sql, _) = translated(
            "SELECT p, a FROM t WHERE u = :username AND x := 1 : 2",
            QuestionMarks,
        );
        assert_eq!(sql, "SELECT p, a FROM t WHERE u = ? AND x := 1 : 2");
    }

    #[test]
    fn an_unknown_placeholder_is_refused_by_name() {
        let message = refusal("SELECT p, a FROM t WHERE u = :username AND realm = :realm");
        assert!(message.contains(":realm"), "{message}");
    }

    #[test]
    fn names_are_matched_exactly() {
        let message = refusal("SELECT p, a FROM t WHERE u = :user");
        assert!(message.contains(":user "), "{message}");
        let message = refusal("SELECT p, a FROM t WHERE u = :usernames");
        assert!(message.contains(":usernames"), "{message}");
    }

    #[test]
    fn a_query_without_username_is_refused() {
        let message = refusal("SELECT p, a FROM t WHERE d = :domain");
        assert!(message.contains(":username"), "{message}");
        let message = refusal("SELECT p, a FROM t WHERE u = ':username'");
        assert!(message.contains(":username"), "{message}");
    }

    #[test]
    fn an_unterminated_quote_runs_to_the_end() {
        let (sql, _) = translated(
            "SELECT p, a FROM t WHERE u = :username AND x = ':domain",
            Numbered,
        );
        assert_eq!(sql, "SELECT p, a FROM t WHERE u = $1 AND x = ':domain");
    }

    #[test]
    fn values_follow_the_positions() {
        let positional = translate(
            "SELECT 1 WHERE :domain = :username OR :domain = ''",
            QuestionMarks,
        )
        .unwrap();
        assert_eq!(
            positional.values("alice", "example.org"),
            ["example.org", "alice", "example.org"]
        );
    }
}
