//! TLS to the broker, for `amqps://` URLs: rustls, trusting the system's root certificates plus
//! those of `broker.tls.ca_file`, presenting a client certificate when `broker.tls.cert_file` and
//! `broker.tls.key_file` are set (mutual TLS). The broker's certificate must name the host of
//! `broker.url`: there is no switch to turn that check off.
//!
//! The files are read at every connection, so a certificate replaced on disk (a rotated secret)
//! is picked up by the next reconnect. Failures say which setting to fix; the private key is
//! never echoed, not even in part.

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use super::BrokerError;

/// `broker.tls.*`: the files TLS needs beyond the system roots. An empty path means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsFiles {
    /// PEM certificates of the CAs to trust besides the system roots (a private CA).
    pub ca_file: PathBuf,
    /// PEM client certificate (its chain may follow) for mutual TLS.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted).
    pub key_file: PathBuf,
}

/// The configuration key of each file, as errors name it.
pub const CA_FILE_KEY: &str = "broker.tls.ca_file";
pub const CERT_FILE_KEY: &str = "broker.tls.cert_file";
pub const KEY_FILE_KEY: &str = "broker.tls.key_file";

impl TlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        [&self.ca_file, &self.cert_file, &self.key_file]
            .iter()
            .any(|p| !p.as_os_str().is_empty())
    }

    /// The keys that are set, for messages.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            (CA_FILE_KEY, &self.ca_file),
            (CERT_FILE_KEY, &self.cert_file),
            (KEY_FILE_KEY, &self.key_file),
        ]
        .into_iter()
        .filter(|(_, p)| !p.as_os_str().is_empty())
        .map(|(k, _)| k)
        .collect()
    }

    /// Checks what can be checked without reading files: a client certificate comes with its
    /// key, and TLS files go with an `amqps://` URL (set on an `amqp://` URL they would be
    /// ignored, and the password sent in clear to a broker the operator meant to reach over TLS).
    pub fn check_against(&self, url: &str) -> Result<(), BrokerError> {
        let cert = !self.cert_file.as_os_str().is_empty();
        let key = !self.key_file.as_os_str().is_empty();
        if cert != key {
            let (set, unset) = if cert {
                (CERT_FILE_KEY, KEY_FILE_KEY)
            } else {
                (KEY_FILE_KEY, CERT_FILE_KEY)
            };
            return Err(BrokerError::TlsSettings {
                reason: format!("{set} is set but {unset} is not: mutual TLS needs both"),
            });
        }
        if self.is_set() && !is_tls_url(url) {
            return Err(BrokerError::TlsSettings {
                reason: format!(
                    "{} set, but broker.url is not an amqps:// URL, so no TLS would be used: \
                     use amqps:// (port 5671 by default), or unset broker.tls.*",
                    self.set_keys().join(" and ")
                ),
            });
        }
        Ok(())
    }

    /// Reads the files into what lapin needs. `Ok(default)` when none is set (system roots
    /// only, no client certificate).
    pub fn load(&self) -> Result<OwnedTLSConfig, BrokerError> {
        let mut config = OwnedTLSConfig::default();
        if !self.ca_file.as_os_str().is_empty() {
            let pem = read_text(CA_FILE_KEY, &self.ca_file)?;
            let certs = certificates(CA_FILE_KEY, &self.ca_file, &pem)?;
            // The connector skips roots it cannot parse without a word; refuse them here.
            let mut store = rustls::RootCertStore::empty();
            let (_, ignored) = store.add_parsable_certificates(certs);
            if ignored > 0 {
                return Err(file_error(
                    CA_FILE_KEY,
                    &self.ca_file,
                    format!("{ignored} of its certificates cannot be used as a trust anchor"),
                ));
            }
            config.cert_chain = Some(pem);
        }
        if !self.cert_file.as_os_str().is_empty() {
            let pem = read_text(CERT_FILE_KEY, &self.cert_file)?;
            let chain = certificates(CERT_FILE_KEY, &self.cert_file, &pem)?;
            let key = std::fs::read(&self.key_file).map_err(|e| {
                file_error(KEY_FILE_KEY, &self.key_file, format!("cannot read it: {e}"))
            })?;
            self.check_key(chain, &key)?;
            config.identity = Some(OwnedIdentity::PKCS8 {
                pem: pem.into_bytes(),
                key,
            });
        }
        Ok(config)
    }

    /// Checks that `key` is a private key rustls can sign with, and the key of the first
    /// certificate of `chain`: otherwise the handshake would fail later with a vaguer message.
    /// Errors say what is wrong without quoting the file (the parsers' own errors may).
    fn check_key(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &[u8],
    ) -> Result<(), BrokerError> {
        let invalid = |reason: String| file_error(KEY_FILE_KEY, &self.key_file, reason);
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
            invalid("it holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned())
        })?;
        // The provider lapin's TLS uses (see Cargo.toml).
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        match CertifiedKey::from_der(chain, key, &provider) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InconsistentKeys(_)) => Err(invalid(format!(
                "it is not the private key of the certificate in {CERT_FILE_KEY} ({})",
                self.cert_file.display()
            ))),
            Err(_) => Err(invalid(
                "its private key cannot be used (RSA, ECDSA P-256/P-384 or Ed25519 expected)"
                    .to_owned(),
            )),
        }
    }

    /// The CA file for messages: its path, or "not set".
    fn ca_file_for_humans(&self) -> String {
        if self.ca_file.as_os_str().is_empty() {
            "not set".to_owned()
        } else {
            self.ca_file.display().to_string()
        }
    }
}

/// Whether the URL asks for TLS (`amqps://`, any case).
pub fn is_tls_url(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
}

fn file_error(key: &'static str, path: &Path, reason: String) -> BrokerError {
    BrokerError::TlsFile {
        key,
        path: path.to_path_buf(),
        reason,
    }
}

fn read_text(key: &'static str, path: &Path) -> Result<String, BrokerError> {
    let bytes =
        std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot read it: {e}")))?;
    String::from_utf8(bytes).map_err(|_| file_error(key, path, "it is not a PEM file".to_owned()))
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("it is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            path,
            "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

/// What went wrong in a TLS handshake, in the operator's terms, when `error` is one: which
/// certificate was refused by whom, and the setting that fixes it.
pub(crate) fn explain(error: &lapin::Error, host: &str, files: &TlsFiles) -> Option<String> {
    use rustls::{CertificateError, Error};
    let tls = rustls_error(error)?;
    Some(match tls {
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the broker's certificate is not valid for `{host}` ({tls}): connect with a host \
             name the certificate lists (broker.url), or have the broker present a certificate \
             for `{host}`"
        ),
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "the broker's certificate is outside its validity period ({tls}): renew it on the \
             broker (or check this machine's clock)"
        ),
        Error::InvalidCertificate(_) => format!(
            "the broker's certificate was not trusted ({tls}): it is signed by none of the \
             system's root CAs nor by a CA in broker.tls.ca_file ({}); set broker.tls.ca_file \
             to the PEM file of the CA that signed the broker's certificate",
            files.ca_file_for_humans()
        ),
        Error::AlertReceived(alert) => {
            let client = if files.cert_file.as_os_str().is_empty() {
                "if it requires a client certificate, set broker.tls.cert_file and \
                 broker.tls.key_file"
                    .to_owned()
            } else {
                format!(
                    "if it refused the client certificate, check that broker.tls.cert_file ({}) \
                     is signed by a CA the broker trusts and matches broker.tls.key_file",
                    files.cert_file.display()
                )
            };
            format!("the broker ended the TLS handshake with the alert {alert:?}: {client}")
        }
        other => format!("the TLS handshake with the broker failed: {other}"),
    })
}

/// The rustls error inside a lapin error, if any: lapin wraps the `io::Error` that rustls
/// returns, which wraps the `rustls::Error` (reached through `get_ref`, not `source`).
fn rustls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: &str, cert: &str, key: &str) -> TlsFiles {
        TlsFiles {
            ca_file: ca.into(),
            cert_file: cert.into(),
            key_file: key.into(),
        }
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_tls_files_need_amqps() {
        let url = "amqps://u:p@mq:5671/%2f";
        assert!(files("", "", "").check_against("amqp://mq").is_ok());
        assert!(files("ca.pem", "c.pem", "k.pem").check_against(url).is_ok());
        let err = files("", "c.pem", "").check_against(url).unwrap_err();
        assert!(
            err.to_string().contains("broker.tls.key_file is not"),
            "{err}"
        );
        let err = files("", "", "k.pem").check_against(url).unwrap_err();
        assert!(
            err.to_string().contains("broker.tls.cert_file is not"),
            "{err}"
        );
        let err = files("ca.pem", "", "")
            .check_against("amqp://u:p@mq:5672/%2f")
            .unwrap_err();
        assert!(
            err.to_string().contains("broker.tls.ca_file set")
                && err.to_string().contains("amqps://"),
            "{err}"
        );
        assert!(is_tls_url("AMQPS://mq"));
        assert!(!is_tls_url("amqp://mq"));
    }

    #[test]
    fn unreadable_or_wrong_files_name_their_setting() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = files(missing.to_str().unwrap(), "", "").load().unwrap_err();
        assert!(
            err.to_string().contains("broker.tls.ca_file")
                && err.to_string().contains("cannot read"),
            "{err}"
        );
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "just some text\n").unwrap();
        let err = files(not_pem.to_str().unwrap(), "", "").load().unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn nothing_set_means_system_roots_only() {
        let config = TlsFiles::default().load().unwrap();
        assert!(config.cert_chain.is_none() && config.identity.is_none());
    }
}
