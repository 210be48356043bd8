//! Certificates for TLS tests, made at test time with Debian's `openssl` CLI: a CA and the
//! server and client certificates it issues (EC P-256, valid for two days).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs Debian's `openssl` CLI in `dir`; panics with its error output if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA in `dir` that issues EC P-256 certificates.
pub struct Ca {
    dir: PathBuf,
    name: String,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let subject = format!("/CN={name}");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &subject,
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Ca {
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// Issues `<file>.pem` and `<file>.key` with subject CN `cn` and the SAN `san` (may be
    /// empty); returns (certificate, key).
    pub fn issue(&self, file: &str, cn: &str, san: &str) -> (PathBuf, PathBuf) {
        let mut ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                       extendedKeyUsage=serverAuth,clientAuth\n"
            .to_owned();
        if !san.is_empty() {
            ext.push_str(&format!("subjectAltName={san}\n"));
        }
        std::fs::write(self.dir.join(format!("{file}.ext")), ext)
            .expect("write the certificate extensions");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{file}.key"),
                "-out",
                &format!("{file}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{file}.csr"),
                "-CA",
                &format!("{}.pem", self.name),
                "-CAkey",
                &format!("{}.key", self.name),
                "-set_serial",
                "0x1234",
                "-days",
                "2",
                "-extfile",
                &format!("{file}.ext"),
                "-out",
                &format!("{file}.pem"),
            ],
        );
        (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        )
    }
}
