//! Bearer tokens with roles, for the public API.
//!
//! A token is `tally_` and 64 hex digits (32 random bytes), made by
//! `tallyctl tokens create`, which prints it once. The tokens file (the
//! coordinator's `tokens_file` key) keeps only each token's SHA-256 hash,
//! with a name and a role, so a copy of the file lets no one call the API:
//!
//! ```toml
//! [[tokens]]
//! name = "ingest"
//! role = "write"
//! sha256 = "5f0c...e3"
//! ```
//!
//! A call's token is hashed and compared with every entry in constant time
//! (no early exit, `subtle`), so how long a check takes says nothing about
//! which bytes matched. A plain hash is enough here, unlike for passwords:
//! the tokens are random 256-bit secrets, not guessable words.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config_file::{self, ConfigError};

/// What a token lets its holder do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read counters: `Get`, `GetBatch`.
    Read,
    /// Read, and increment: `Increment`, `IncrementBatch`.
    Write,
    /// Everything: `Delete` and the `Admin` service too.
    Admin,
}

impl Role {
    /// The role's name, as the tokens file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    /// Whether this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}; use read, write or admin")),
        }
    }
}

/// The tokens file, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    role: Role,
    sha256: String,
}

/// One known token.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    role: Role,
    hash: [u8; 32],
}

/// Who a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    /// The token's name in the file.
    pub name: &'a str,
    /// What it may do.
    pub role: Role,
}

/// The known tokens (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

/// The prefix of every token, so that a leaked one is easy to find in logs
/// and by secret scanners.
pub const TOKEN_PREFIX: &str = "tally_";

impl Tokens {
    /// Reads the tokens file at `path`. An error names the file, and the
    /// entry and key at fault.
    pub fn load(path: &Path) -> Result<Tokens, ConfigError> {
        let raw: RawTokens = config_file::load(path)?;
        let origin = path.display().to_string();
        let mut entries = Vec::with_capacity(raw.tokens.len());
        for (index, token) in raw.tokens.into_iter().enumerate() {
            let invalid = |key: &str, message: String| {
                ConfigError::invalid(&origin, format!("tokens[{index}].{key}"), message)
            };
            if token.name.is_empty() {
                return Err(invalid("name", "is empty".into()));
            }
            let hash = parse_hash(&token.sha256).ok_or_else(|| {
                invalid(
                    "sha256",
                    "is not 64 hex digits (the SHA-256 of a token)".into(),
                )
            })?;
            if entries.iter().any(|entry: &Entry| entry.name == token.name) {
                return Err(invalid("name", format!("{:?} is used twice", token.name)));
            }
            if entries.iter().any(|entry: &Entry| entry.hash == hash) {
                return Err(invalid(
                    "sha256",
                    "is another entry's: one token would have two names".into(),
                ));
            }
            entries.push(Entry {
                name: token.name,
                role: token.role,
                hash,
            });
        }
        Ok(Tokens { entries })
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is known (then every call is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The holder of the token named `name` in the file, if there is one.
    pub fn holder_named(&self, name: &str) -> Option<Holder<'_>> {
        self.entries
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| Holder {
                name: &entry.name,
                role: entry.role,
            })
    }

    /// The holder of `token`, if it is known. Takes the same time whichever
    /// entry matches, or none.
    pub fn holder(&self, token: &[u8]) -> Option<Holder<'_>> {
        let hash: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(entry);
            }
        }
        found.map(|entry| Holder {
            name: &entry.name,
            role: entry.role,
        })
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(text.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A new random token, and the SHA-256 hash the tokens file keeps of it.
pub fn generate() -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&secret));
    let hash = hash_of(&token);
    Ok((token, hash))
}

/// The hex SHA-256 of `token`, as the tokens file keeps it.
pub fn hash_of(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A tokens-file entry for a token of `name` with `role`, whose hash is
/// `hash`: append it to the file.
pub fn file_entry(name: &str, role: Role, hash: &str) -> String {
    format!("[[tokens]]\nname = {name:?}\nrole = \"{role}\"\nsha256 = \"{hash}\"\n")
}

/// The token in an `authorization` header value: `Bearer TOKEN` (the
/// scheme in any case, as HTTP allows).
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_generated_token_is_known_by_its_hash_only() {
        let (reader, reader_hash) = generate().unwrap();
        let (admin, admin_hash) = generate().unwrap();
        assert!(reader.starts_with(TOKEN_PREFIX) && reader.len() == 70);
        assert_ne!(reader, admin);
        let text = file_entry("dashboards", Role::Read, &reader_hash)
            + &file_entry("ops", Role::Admin, &admin_hash);
        assert!(!text.contains(&reader) && !text.contains(&admin));
        let (_dir, path) = tokens_file(&text);
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.holder(reader.as_bytes()),
            Some(Holder {
                name: "dashboards",
                role: Role::Read
            })
        );
        assert_eq!(tokens.holder(admin.as_bytes()).unwrap().role, Role::Admin);
        assert_eq!(tokens.holder(b"tally_00"), None);
        assert_eq!(tokens.holder(reader_hash.as_bytes()), None);
    }

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Write) && Role::Admin.allows(Role::Read));
        assert!(Role::Write.allows(Role::Read) && !Role::Write.allows(Role::Admin));
        assert!(!Role::Read.allows(Role::Write));
    }

    #[test]
    fn a_bad_entry_is_named() {
        for (text, expected) in [
            (
                "[[tokens]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"00\"\n",
                "role: unknown variant `root`",
            ),
            (
                "[[tokens]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"00\"\n",
                "tokens[0].sha256: is not 64 hex digits",
            ),
            (
                "[[tokens]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"00\"\ntoken = \"x\"\n",
                "unknown key `token`",
            ),
        ] {
            let (_dir, path) = tokens_file(text);
            let message = Tokens::load(&path).unwrap_err().to_string();
            assert!(
                message.starts_with(&path.display().to_string()),
                "{message}"
            );
            assert!(message.contains(expected), "{message}");
        }
        let hash = hash_of("x");
        let (_dir, path) = tokens_file(
            &(file_entry("a", Role::Read, &hash) + &file_entry("a", Role::Write, &hash)),
        );
        let message = Tokens::load(&path).unwrap_err().to_string();
        assert!(message.contains("tokens[1].name"), "{message}");
        let (_dir, path) = tokens_file(
            &(file_entry("a", Role::Read, &hash) + &file_entry("b", Role::Admin, &hash)),
        );
        let message = Tokens::load(&path).unwrap_err().to_string();
        assert!(message.contains("tokens[1].sha256"), "{message}");
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(b"Bearer tally_ab"), Some(&b"tally_ab"[..]));
        assert_eq!(bearer(b"bearer tally_ab"), Some(&b"tally_ab"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Basic dXNlcg=="), None);
        assert_eq!(bearer(b"tally_ab"), None);
    }
}
